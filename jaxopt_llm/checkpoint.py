"""Orbax checkpoints of the whole train state (step, params, optimiser state), local or in a bucket.

Writes are asynchronous and atomic: a step directory appears only once complete, so after a crash the
latest step found is a whole one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxopt_llm import paths
from jaxopt_llm.errors import UserError


class CheckpointRestoreError(UserError):
    """No checkpoint of a run folder restores; the message names the folder and the fix."""


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2):
        directory = paths.Path(directory)
        self.directory = directory if paths.is_remote(directory) else directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        # in a bucket, one object per array chunk rather than OCDBT's shared manifest: its conditional writes
        # need generation semantics not every GCS-compatible store (or emulator) has
        handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=not paths.is_remote(directory)),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"),
                                             item_handlers=handlers)

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts an asynchronous save; the arrays are copied before this returns."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state, meta, step) of `step` (default: the latest) into the shapes, dtypes and shardings of
        `abstract_state` (from `jax.eval_shape`, optionally with `.sharding`)."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}.")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"], step

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the newest checkpoint that restores, or None when there is none. A step that
        fails (truncated or corrupt files) is skipped with a message saying which and why."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                return self.restore(abstract_state, step)
            except Exception as err:  # orbax / tensorstore errors run to pages; one line says enough
                reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}"
                failures.append(f"step {step} ({reason})")
                print(f"checkpoint: step {step} in {self.directory} does not restore ({reason}); trying an older "
                      "one", file=sys.stderr)
        if failures:
            raise CheckpointRestoreError(f"no checkpoint in {str(self.directory)!r} restores: {'; '.join(failures)}. "
                                         "Delete that folder to start the run afresh.")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def has_steps(directory: str | Path) -> bool:
    """Whether a checkpoint folder holds any step (complete or not), without opening a manager."""
    directory = paths.Path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
