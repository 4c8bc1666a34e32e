"""Training: `train(config, workdir)` assembles a run (model, tokenizer, data, the method's recipe) and
`fit(recipe, ...)` runs it: steps, parallelism, evaluation, logging (tqdm, metrics.jsonl, TensorBoard,
run.json), checkpoints and exact resume. `fit` knows no task and no method.

Running the same command with the same workdir resumes from the latest complete checkpoint; every loss
logged after that point is bit-identical to an uninterrupted run's (a test kills a run with SIGKILL).
"""

from __future__ import annotations

import datetime
import json
import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxopt_llm import checkpoint, optim, paths, recipes
from jaxopt_llm import config as config_lib
from jaxopt_llm import data as data_lib
from jaxopt_llm import state as state_lib
from jaxopt_llm.config import Config, TrainConfig
from jaxopt_llm.errors import Preempted, UserError
from jaxopt_llm.models import config_of, from_pretrained, load_tokenizer, resolve, save_pretrained
from jaxopt_llm.parallel import Parallel, compile_count, initialize_distributed
from jaxopt_llm.recipes import Context, Recipe
from jaxopt_llm.runs import RunFolder, write_json


class TrainingError(UserError):
    """A run cannot go on as configured; the message says why and what to change."""




class _Preemption:
    """Notes SIGTERM and SIGINT (Ctrl-C) instead of dying mid-write; `requested()` is agreed by all processes
    (any one told to stop stops them all, at the same step). After the step in flight is checkpointed, SIGTERM
    ends the run with `Preempted`, SIGINT with KeyboardInterrupt; a second SIGINT interrupts at once."""

    def __init__(self):
        self.flag, self.interrupted, self.previous = False, False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _note(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
        self.flag = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        return bool(np.max(multihost_utils.process_allgather(np.asarray(int(self.flag), np.int32))))


def _finite_or_none(value):
    """JSON has no NaN or Infinity: non-finite numbers are logged as null."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def read_metrics(file) -> list[dict]:
    """The events of a metrics.jsonl; a last line cut off by a crash is ignored."""
    file = paths.Path(file)
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """metrics.jsonl (one JSON object per event) and TensorBoard, written by process 0 only."""

    def __init__(self, run: RunFolder, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.file = run.metrics_file
        if not enabled:
            return
        if self.file.exists():  # drop what was logged after the checkpoint we resume from, atomically
            kept = [r for r in read_metrics(self.file) if resume_step is not None and r["step"] <= resume_step]
            paths.write_text(self.file, "".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: _finite_or_none(v) for k, v in values.items()}}
        paths.append_text(self.file, json.dumps(row, allow_nan=False) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


def _to_json(metrics) -> dict:
    """{name: (sum, count)} float32 device metrics as lists: exact through JSON, so that a resumed log interval
    sums to what a straight run's does."""
    return {name: [np.asarray(jax.device_get(x)).tolist() for x in pair] for name, pair in metrics.items()}


def _from_json(metrics: dict) -> dict:
    return {name: tuple(np.asarray(x, np.float32) for x in pair) for name, pair in metrics.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("jaxopt_llm", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate(eval_fn: Callable, params, aux, task, arrays: dict, parallel: Parallel, batch_size: int,
             limit: int | None) -> dict[str, float]:
    total = None
    for batch in data_lib.eval_batches(arrays, batch_size, process_index=jax.process_index(),
                                       process_count=jax.process_count(), limit=limit):
        metrics = eval_fn(params, parallel.put_batch(batch), aux)
        total = metrics if total is None else jax.tree.map(jnp.add, total, metrics)
    return task.summarize(total)


def fit(recipe: Recipe, data: data_lib.Data, workdir: str | Path, cfg: TrainConfig, parallel: Parallel, *,
        record: dict | None = None, tokenizer: Any = None, changes: dict | None = None) -> dict[str, float]:
    """Train `recipe` on `data` in the run folder `workdir` (resuming from its newest checkpoint that
    restores); returns the final eval metrics. `record` is merged into run.json; `changes` (key -> [old, new])
    are the settings changed since the run started, recorded in its history; `tokenizer` is saved with the
    exported model. A finished run is not run again: its final eval metrics are returned.

    SIGTERM from the start on (a preempted VM) finishes the step in flight, saves it and raises `Preempted`;
    once the last step is done the run completes anyway."""
    with _Preemption() as preemption:
        return _fit(recipe, data, workdir, cfg, parallel, record=record, tokenizer=tokenizer, changes=changes,
                    preemption=preemption)


def _fit(recipe: Recipe, data: data_lib.Data, workdir: str | Path, cfg: TrainConfig, parallel: Parallel, *,
         record: dict | None, tokenizer: Any, changes: dict | None, preemption: _Preemption) -> dict[str, float]:
    parallel = parallel.for_members(recipe.members)
    parallel.check_batch_size(cfg.batch_size)  # before the run folder exists (`train` checks before building too)
    run = RunFolder(workdir)
    run.path.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    accum, total_micro = cfg.grad_accum, cfg.steps * cfg.grad_accum
    ckpts = checkpoint.Checkpoints(run.checkpoints, keep=cfg.keep_checkpoints)
    if ckpts.latest() == total_micro and ((run.model / "config.json").is_file() or run.members()):
        ckpts.close()
        evals = [r for r in read_metrics(run.metrics_file) if r["split"] == "eval"]
        final = {k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "split")}
        if main:
            print(f"{run.path} already finished at step {cfg.steps}; final eval: {json.dumps(final)}. Use a new "
                  "--workdir to train again, or raise train.steps to continue.", file=sys.stderr)
        return final
    abstract = state_lib.abstract(recipe.params, recipe.tx)
    if not parallel.pmap:
        abstract = checkpoint.with_shardings(abstract, parallel.state_shardings(abstract))
    restored = ckpts.restore_latest(abstract)
    if restored is None:
        host_state, resume_step, interval, interval_steps = state_lib.create(recipe.params, recipe.tx), None, None, 0
    else:
        host_state, meta, resume_step = restored
        interval = _from_json(meta["interval"]) if meta.get("interval") is not None else None
        interval_steps = meta.get("interval_steps", 0)
        if main:
            print(f"resuming from step {resume_step} in {run.path}", file=sys.stderr)
    key = parallel.put_key(jax.random.key_data(jax.random.key(cfg.seed)))  # the run's one base key
    state = parallel.put_state(host_state)
    aux = parallel.put_state(recipe.aux)
    del host_state
    train_fn = parallel.compile_train(recipe.train_step, state, aux)
    eval_fn = parallel.compile_eval(recipe.eval_step)
    make_batches = recipe.batches or data_lib.Batches
    batches = make_batches(data.train, cfg.batch_size, cfg.seed, process_index=jax.process_index(),
                           process_count=jax.process_count())
    log = MetricsLog(run, None if resume_step is None else resume_step // accum, main)
    baseline = recipe.task.baseline(data.train, data.eval)
    if main:
        if data.label_names is not None:
            write_json(run.labels_file, list(data.label_names))
        session = {"event": "start" if resume_step is None else "resume", "step": resume_step or 0,
                   "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "command": sys.argv, **({"changes": changes} if changes else {})}
        earlier = run.record() if resume_step is not None else {}
        if resume_step is None:
            session["config"] = (record or {}).get("config")  # the original settings, kept for good
        write_json(run.record_file, {**earlier, **(record or {}), "versions": _versions(),
                                     "git_revision": _git_revision(), "device_kind": jax.devices()[0].device_kind,
                                     "device_count": len(parallel.devices), "process_count": jax.process_count(),
                                     "command": sys.argv, "label_names": data.label_names,
                                     "resumed_from": resume_step, "data": [str(r) for r in data.reports],
                                     "baseline": baseline, "history": earlier.get("history", []) + [session]})
        for name, value in baseline.items():
            print(f"data: {name.replace('_', ' ')} on the eval split: {value:.4f}", file=sys.stderr)

    micro = int(jax.device_get(parallel.host_state(state).step))  # = global batches consumed
    lr = optim.schedule(cfg)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=micro // accum, disable=not (cfg.progress and main), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    interval_start = time.perf_counter()
    eval_metrics: dict[str, float] = {}
    step_compiles = 0
    while micro < total_micro:
        batch = parallel.put_batch(batches[micro], stacked=bool(recipe.members))
        before = compile_count()
        state, metrics = train_fn(state, batch, key, aux)
        step_compiles += compile_count() - before
        micro += 1
        interval = metrics if interval is None else jax.tree.map(jnp.add, interval, metrics)
        interval_steps += 1
        if micro % accum:
            continue
        update = micro // accum
        bar.update(1)
        if update % cfg.log_every == 0 or update == cfg.steps:
            values = recipe.task.summarize(interval)
            elapsed = time.perf_counter() - interval_start
            values["learning_rate"] = float(lr(max(update - 1, 0)))
            skipped = int(jax.device_get(optim.skipped_updates(parallel.host_state(state).opt_state)))
            values["skipped_updates"] = skipped
            log.write(update, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.4f}",
                            seq_per_s=f"{interval_steps * cfg.batch_size / max(elapsed, 1e-9):.1f}")
            interval, interval_start, interval_steps = None, time.perf_counter(), 0
            if skipped == update:
                raise TrainingError(f"stopped at step {update}: every update so far had non-finite values and was "
                                    "skipped, so nothing trains. Lower train.learning_rate, check the data, or "
                                    f"use model.dtype=float32. The run folder {run.path} is left as it is.")
        if update % cfg.eval_every == 0 or update == cfg.steps:
            eval_metrics = evaluate(eval_fn, state.params, aux, recipe.task, data.eval, parallel, cfg.batch_size,
                                    cfg.eval_batches)
            log.write(update, "eval", eval_metrics)
            if main:
                bar.write(f"step {update}: eval " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        stop = preemption.requested()
        if micro % (cfg.checkpoint_every * accum) == 0 or micro == total_micro or stop:
            # the log interval's running sums travel with the state: a resumed run logs what a straight one does
            ckpts.save(micro, parallel.host_state(state), {"update": update, "interval_steps": interval_steps,
                                                          "interval": None if interval is None else _to_json(interval)})
        if stop:  # SIGTERM or SIGINT: this step is saved; stop here, all processes at the same step
            ckpts.wait()
            ckpts.close()
            log.close()
            if preemption.interrupted:
                raise KeyboardInterrupt
            raise Preempted(update, run.path)
    bar.close()  # SIGTERM from here on: the run is finished anyway, so it completes
    ckpts.wait()
    ckpts.close()
    log.close()
    params = multihost_utils.process_allgather(parallel.host_state(state).params, tiled=True)
    if main:
        exported = recipe.export(params)
        for target, model in ([(run.member(i), m) for i, m in enumerate(exported)] if isinstance(exported, list)
                              else [(run.model, exported)]):  # an ensemble: one Hugging Face folder per member
            if paths.is_remote(target):  # written whole locally, then uploaded
                with tempfile.TemporaryDirectory() as tmp:
                    save_pretrained(model, Path(tmp) / "model", tokenizer=tokenizer)
                    paths.copy(Path(tmp) / "model", target)
            else:
                save_pretrained(model, target, tokenizer=tokenizer)
        for name, value in {**recipe.task.files(), **recipe.files}.items():
            run.write(name, value)
        if recipe.write is not None:
            recipe.write(params, run, exported)
        record = run.record()
        record["train_step_compiles"] = step_compiles  # 1 when the step compiled once (0 if nothing ran)
        write_json(run.record_file, record)
    if not eval_metrics:  # resumed after the last eval: report the logged one
        evals = [r for r in read_metrics(run.metrics_file) if r["split"] == "eval"]
        eval_metrics = {k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("step", "split")}
    return eval_metrics


def label_names_for(config: Config, run: RunFolder, base: str, needs) -> tuple[str, ...] | None:
    """The label names a run must keep, in id order: those the run started with (resuming), else the order
    the task fixes (a verbalizer's), else those of the base model (its run folder's labels, or its trained
    head's); None lets the data decide (sorted names)."""
    if not needs.labels:
        return None
    if run.labels() is not None and checkpoint.has_steps(run.checkpoints):
        return run.labels()
    if needs.label_names:
        return tuple(needs.label_names)
    if config.data.labels:
        return tuple(name.strip() for name in config.data.labels.split(",") if name.strip())
    if config.model.num_labels == 1:
        return None
    base_run = RunFolder.of(base)
    if base_run is not None and base_run.labels():
        return base_run.labels()
    return config_of(resolve(base)).labels or None


def loader(config: Config, head: str, labels: tuple[str, ...] | None, num_labels: int | None) -> Callable:
    """`load(reference) -> Bert` with the run's head, label names, dtype, dropout and seed."""
    m = config.model
    changes: dict[str, Any] = {"dropout_rng": m.dropout_rng}
    if labels and num_labels and num_labels > 1 and len(labels) == num_labels:
        changes["labels"] = tuple(labels)
    if m.hidden_dropout is not None:
        changes["hidden_dropout_prob"] = m.hidden_dropout
    if m.attention_dropout is not None:
        changes["attention_probs_dropout_prob"] = m.attention_dropout
    if m.scan_layers:
        changes.update(scan_layers=True, remat=m.remat, scan_unroll=m.scan_unroll)
    if m.unpad:
        changes["unpad"] = m.unpad

    def load(reference: str, head_: str | None = None, seed: int | None = None):
        seed = config.train.seed if seed is None else seed  # the seed of freshly initialised heads
        if head_ not in (None, head):  # another head (a prompt teacher's MLM): no labels to carry
            return from_pretrained(resolve(reference), head_, dtype=m.dtype, seed=seed)
        return from_pretrained(resolve(reference), head, num_labels=num_labels, dtype=m.dtype, seed=seed, **changes)

    return load


def train(config: Config, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) the configured training in the run folder `workdir`; returns the final eval metrics.

    Everything is checked before anything is written or compiled: a resume whose settings differ from the
    run's first ones (other than config.RESUMABLE) is refused, naming each change.
    """
    initialize_distributed()
    main = jax.process_index() == 0
    run = RunFolder(workdir)
    changes = None
    if run.record().get("config") and checkpoint.has_steps(run.checkpoints):
        first = run.record().get("history", [{}])[0].get("config") or run.record()["config"]
        changes = config_lib.resume_changes(first, config, str(workdir))
    parallel = Parallel(config.parallel)  # bad device settings stop before the model is built (which compiles);
    parallel.check_batch_size(config.train.batch_size)  # fit checks again for its own callers
    method = recipes.get(config.method)
    base = str(method.base_model(config.options) or config.model.name_or_path)
    base_folder = resolve(base)
    positions = config_of(base_folder).max_tokens  # the tokens a sequence may hold (RoBERTa: positions - 2)
    if config.data.max_length > positions:
        raise config_lib.ConfigError(f"data.max_length={config.data.max_length} is more than the model's "
                                     f"{positions} positions ({base_folder}): set "
                                     f"data.max_length <= {positions}.")
    tokenizer = load_tokenizer(base_folder)
    task = recipes.make_task(config, tokenizer)
    names = label_names_for(config, run, base, task.data)
    data = data_lib.load(config.data, tokenizer, task.data, num_labels=config.model.num_labels, names=names,
                         seed=config.train.seed, encoders=tuple(method.encoders(config.options, task, tokenizer)))
    if main:
        for report in data.reports:
            print(f"data: {report}", file=sys.stderr)
        print(f"data: {len(next(iter(data.train.values())))} train / {len(next(iter(data.eval.values())))} "
              f"eval examples", file=sys.stderr)
    if hasattr(task, "bind"):  # a task that depends on the data's label names (token tags and their scheme)
        task = task.bind(data.label_names)
    num_labels = (config.model.num_labels or len(data.label_names)) if task.data.labels else None
    ctx = Context(task=task, tx=optim.make(config.train), seed=config.train.seed, model=config.model.name_or_path,
                  load=loader(config, task.head, data.label_names, num_labels), labels=data.label_names,
                  tokenizer=tokenizer)
    recipe = method.build(ctx, config.options)
    return fit(recipe, data, workdir, config.train, parallel,
               record={"config": config.to_dict(), "task": config.task, "method": config.method}, tokenizer=tokenizer,
               changes=changes)
