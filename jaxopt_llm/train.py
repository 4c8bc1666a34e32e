"""Training: `train(config, workdir)` assembles a run (model, tokenizer, data, the method's recipe) and
`fit(recipe, ...)` runs it: steps, parallelism, evaluation, logging (tqdm, metrics.jsonl, TensorBoard,
run.json), checkpoints and exact resume. `fit` knows no task and no method.

Running the same command with the same workdir resumes from the latest complete checkpoint; every loss
logged after that point is bit-identical to an uninterrupted run's (a test kills a run with SIGKILL).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import multihost_utils

from jaxopt_llm import checkpoint, optim, recipes
from jaxopt_llm import data as data_lib
from jaxopt_llm import state as state_lib
from jaxopt_llm.bert.modeling import BertConfig
from jaxopt_llm.bert.params import from_pretrained, read_config, resolve, save_pretrained
from jaxopt_llm.config import Config, TrainConfig
from jaxopt_llm.parallel import Parallel, compile_count, initialize_distributed
from jaxopt_llm.recipes import Context, Recipe
from jaxopt_llm.runs import RunFolder, write_json


class MetricsLog:
    """metrics.jsonl (one JSON object per event) and TensorBoard, written by process 0 only."""

    def __init__(self, run: RunFolder, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.file = run.metrics_file
        if not enabled:
            return
        if self.file.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.file.read_text().splitlines()
                    if line.strip() and resume_step is not None and json.loads(line)["step"] <= resume_step]
            self.file.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(run.tensorboard))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.file.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()


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
        record: dict | None = None, tokenizer: Any = None) -> dict[str, float]:
    """Train `recipe` on `data` in the run folder `workdir` (resuming from its latest checkpoint); returns
    the final eval metrics. `record` is merged into run.json; `tokenizer` is saved with the exported model."""
    run = RunFolder(workdir)
    run.path.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    parallel.check_batch_size(cfg.batch_size)
    ckpts = checkpoint.Checkpoints(run.checkpoints, keep=cfg.keep_checkpoints)
    resume_step = ckpts.latest()
    if resume_step is None:
        host_state = state_lib.create(recipe.params, recipe.tx)
    else:
        abstract = state_lib.abstract(recipe.params, recipe.tx)
        if not parallel.pmap:
            abstract = checkpoint.with_shardings(abstract, parallel.state_shardings(abstract))
        host_state, _, _ = ckpts.restore(abstract, resume_step)
        if main:
            print(f"resuming from step {resume_step} in {run.path}", file=sys.stderr)
    key = parallel.put_key(jax.random.key_data(jax.random.key(cfg.seed)))  # the run's one base key
    state = parallel.put_state(host_state)
    aux = parallel.put_state(recipe.aux)
    del host_state
    train_fn = parallel.compile_train(recipe.train_step, state, aux)
    eval_fn = parallel.compile_eval(recipe.eval_step)
    batches = data_lib.Batches(data.train, cfg.batch_size, cfg.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
    log = MetricsLog(run, None if resume_step is None else resume_step // cfg.grad_accum, main)
    baseline = recipe.task.baseline(data.train, data.eval)
    if main:
        if data.label_names is not None:
            write_json(run.labels_file, list(data.label_names))
        write_json(run.record_file, {**(record or {}), "versions": _versions(), "git_revision": _git_revision(),
                                     "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
                                     "process_count": jax.process_count(), "command": sys.argv,
                                     "label_names": data.label_names, "resumed_from": resume_step,
                                     "data": [str(r) for r in data.reports], "baseline": baseline})
        for name, value in baseline.items():
            print(f"data: {name.replace('_', ' ')} on the eval split: {value:.4f}", file=sys.stderr)

    accum = cfg.grad_accum
    micro = int(jax.device_get(parallel.host_state(state).step))  # = global batches consumed
    total_micro = cfg.steps * accum
    lr = optim.schedule(cfg)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=micro // accum, disable=not (cfg.progress and main), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    interval, interval_start, interval_steps = None, time.perf_counter(), 0
    eval_metrics: dict[str, float] = {}
    step_compiles = 0
    while micro < total_micro:
        batch = parallel.put_batch(batches[micro])
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
            values["skipped_updates"] = int(jax.device_get(optim.skipped_updates(
                parallel.host_state(state).opt_state)))
            log.write(update, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.4f}",
                            seq_per_s=f"{interval_steps * cfg.batch_size / max(elapsed, 1e-9):.1f}")
            interval, interval_start, interval_steps = None, time.perf_counter(), 0
        if update % cfg.eval_every == 0 or update == cfg.steps:
            eval_metrics = evaluate(eval_fn, state.params, aux, recipe.task, data.eval, parallel, cfg.batch_size,
                                    cfg.eval_batches)
            log.write(update, "eval", eval_metrics)
            if main:
                bar.write(f"step {update}: eval " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        if micro % (cfg.checkpoint_every * accum) == 0 or micro == total_micro:
            ckpts.save(micro, parallel.host_state(state), {"update": update})
    bar.close()
    ckpts.wait()
    ckpts.close()
    log.close()
    params = multihost_utils.process_allgather(parallel.host_state(state).params, tiled=True)
    if main:
        save_pretrained(recipe.export(params), run.model, tokenizer=tokenizer)
        for name, value in recipe.files.items():
            run.write(name, value)
        record = run.record()
        record["train_step_compiles"] = step_compiles  # 1 when the step compiled once (0 if nothing ran)
        write_json(run.record_file, record)
    return eval_metrics


def label_names_for(config: Config, run: RunFolder, base_folder: Path, labelled: bool) -> tuple[str, ...] | None:
    """The label names a run must keep, in id order: those the run started with (resuming), else those of
    the base model's trained head; None lets the data decide (sorted names)."""
    if not labelled:
        return None
    if run.labels() is not None and run.checkpoints.is_dir():
        return run.labels()
    if config.model.num_labels == 1:
        return None
    return BertConfig.from_hf_config(read_config(base_folder)).labels or None


def loader(config: Config, head: str, labels: tuple[str, ...] | None, num_labels: int | None) -> Callable:
    """`load(reference) -> Bert` with the run's head, label names, dtype, dropout and seed."""
    m = config.model
    changes: dict[str, Any] = {}
    if labels and num_labels and num_labels > 1 and len(labels) == num_labels:
        changes["labels"] = tuple(labels)
    if m.hidden_dropout is not None:
        changes["hidden_dropout_prob"] = m.hidden_dropout
    if m.attention_dropout is not None:
        changes["attention_probs_dropout_prob"] = m.attention_dropout

    def load(reference: str):
        return from_pretrained(resolve(reference), head, num_labels=num_labels, dtype=m.dtype, seed=config.train.seed,
                               **changes)

    return load


def train(config: Config, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) the configured training in the run folder `workdir`; returns the final eval metrics."""
    from transformers import AutoTokenizer

    initialize_distributed()
    main = jax.process_index() == 0
    method = recipes.get(config.method)
    base_folder = resolve(method.base_model(config.options) or config.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    task = recipes.make_task(config, tokenizer)
    run = RunFolder(workdir)
    names = label_names_for(config, run, base_folder, task.data.labels)
    data = data_lib.load(config.data, tokenizer, task.data, num_labels=config.model.num_labels, names=names,
                         seed=config.train.seed)
    if main:
        for report in data.reports:
            print(f"data: {report}", file=sys.stderr)
        print(f"data: {len(next(iter(data.train.values())))} train / {len(next(iter(data.eval.values())))} "
              f"eval examples", file=sys.stderr)
    num_labels = (config.model.num_labels or len(data.label_names)) if task.data.labels else None
    ctx = Context(task=task, tx=optim.make(config.train), seed=config.train.seed, model=config.model.name_or_path,
                  load=loader(config, task.head, data.label_names, num_labels), labels=data.label_names)
    recipe = method.build(ctx, config.options)
    return fit(recipe, data, workdir, config.train, Parallel(config.parallel),
               record={"config": config.to_dict(), "task": config.task, "method": config.method}, tokenizer=tokenizer)
