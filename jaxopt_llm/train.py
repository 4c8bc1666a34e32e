"""The training loop shared by pretraining and fine-tuning: data, steps, parallelism, evaluation,
logging (tqdm, metrics.jsonl, TensorBoard, run.json), checkpoints and exact resume.

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
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxopt_llm import checkpoint, optim
from jaxopt_llm import data as data_lib
from jaxopt_llm import state as state_lib
from jaxopt_llm.bert.modeling import BertConfig
from jaxopt_llm.bert.params import from_pretrained, read_config, resolve, save_pretrained
from jaxopt_llm.config import PACKAGED_MINILM, Config
from jaxopt_llm.parallel import Parallel, compile_count, initialize_distributed
from jaxopt_llm.steps import adversarial, classify, distill, mlm
from jaxopt_llm.steps.common import mean_metrics


def model_folder(name_or_path: str) -> Path:
    if name_or_path == PACKAGED_MINILM:
        from jaxopt_llm.assets import minilm_path

        return minilm_path()
    return resolve(name_or_path)


def teacher_folder(name_or_path: str) -> str:
    """A run folder written by `finetune` stands for its exported model/ folder."""
    path = Path(name_or_path)
    return str(path / "model") if (path / "model" / "config.json").is_file() else name_or_path


def model_task(config: Config) -> str:
    if config.task == "finetune":
        return "sequence-classification"
    return "pretraining" if config.data.next_sentence else "masked-lm"


def summarize(metrics: dict) -> dict[str, float]:
    """Means of (sum, count) metrics; a confusion matrix becomes macro-F1."""
    confusion = metrics.pop("confusion", None)
    out = mean_metrics(metrics)
    if confusion is not None:
        c = np.asarray(jax.device_get(confusion[0]), np.float64)
        c = c.reshape(-1, *c.shape[-2:]).sum(0)
        tp, fp, fn = np.diag(c), c.sum(0) - np.diag(c), c.sum(1) - np.diag(c)
        denominator = 2 * tp + fp + fn
        present = denominator > 0
        out["f1"] = float(np.mean(2 * tp[present] / denominator[present])) if present.any() else float("nan")
    return out


class MetricsLog:
    """metrics.jsonl (one JSON object per event) and TensorBoard, written by process 0 only."""

    def __init__(self, workdir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.file = workdir / "metrics.jsonl"
        if not enabled:
            return
        if self.file.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.file.read_text().splitlines()
                    if line.strip() and resume_step is not None and json.loads(line)["step"] <= resume_step]
            self.file.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(workdir / "tensorboard"))

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


def write_run_record(workdir: Path, config: Config, extra: dict) -> None:
    devices = jax.devices()
    record = {"config": config.to_dict(), "versions": _versions(), "git_revision": _git_revision(),
              "device_kind": devices[0].device_kind, "device_count": len(devices),
              "process_count": jax.process_count(), "command": sys.argv, **extra}
    (workdir / "run.json").write_text(json.dumps(record, indent=2, default=str))


def build_steps(config: Config, graphdef, tx, tokenizer, axis_name) -> tuple[Callable, Callable]:
    """(train_step, eval_step) for the config: clean or adversarial training; evaluation is always clean."""
    a = config.adversarial
    masking = _masking(config, tokenizer)
    if config.task == "finetune":
        train_step = classify.make_train_step(graphdef, tx, axis_name)
        eval_step = classify.make_eval_step(graphdef, axis_name)
    else:
        train_step = mlm.make_train_step(graphdef, tx, masking, axis_name)
        eval_step = mlm.make_eval_step(graphdef, masking, config.train.seed, axis_name)
    if a.enabled:
        adv = adversarial.Adversary.from_config(a)
        task = adversarial.classification_task() if config.task == "finetune" else adversarial.mlm_task(masking)
        train_step = adversarial.make_train_step(graphdef, tx, adv, task, axis_name)
    return train_step, eval_step


def majority_baseline(data: data_lib.Data) -> float:
    """Eval accuracy of always predicting the most frequent training label: the number to beat."""
    majority = np.bincount(data.train["labels"]).argmax()
    return float(np.mean(data.eval["labels"] == majority))


def evaluate(eval_fn: Callable, params, arrays: dict, parallel: Parallel, batch_size: int,
             limit: int | None) -> dict[str, float]:
    total = None
    for batch in data_lib.eval_batches(arrays, batch_size, process_index=jax.process_index(),
                                       process_count=jax.process_count(), limit=limit):
        metrics = eval_fn(params, parallel.put_batch(batch))
        total = metrics if total is None else jax.tree.map(jnp.add, total, metrics)
    return summarize(total)


def build(config: Config, folder: Path, tokenizer, num_labels: int | None, changes: dict, tx, axis_name):
    """(graphdef, params, train_step, eval_step, extra step arguments, unwrap) for the config.

    The train step is called as `train_step(state, batch, key, *extras)`; `unwrap(model)` is the BERT to
    export. Distillation trains a `Student` (BERT + projection) and passes the frozen teacher's params.
    """
    t = config.train
    if not config.distill.enabled:
        model = from_pretrained(folder, model_task(config), num_labels=num_labels, dtype=config.model.dtype,
                                seed=t.seed, **changes)
        graphdef, params = nnx.split(model)
        return (graphdef, params, *build_steps(config, graphdef, tx, tokenizer, axis_name), (), lambda m: m)
    k = config.distill
    teacher = from_pretrained(folder, model_task(config), num_labels=num_labels, dtype=config.model.dtype,
                              seed=t.seed, **{c: v for c, v in changes.items() if c == "labels"})
    student_cfg = distill.student_config(teacher.config, k.student_layers,
                                         **{c: v for c, v in changes.items() if c != "labels"})
    bert = distill.init_student(teacher, student_cfg, k.init, t.seed)
    kd = distill.Distillation.from_config(k)
    student = distill.Student(bert, teacher.config.hidden_size, k.hidden_weight > 0, rngs=nnx.Rngs(t.seed + 1))
    graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_params = nnx.split(teacher)
    masking = None if config.task == "finetune" else _masking(config, tokenizer)
    kd_step = distill.make_train_step(graphdef, teacher_graphdef, tx, kd, masking, axis_name)

    def train_step(state, batch, key, teacher):  # the loop's argument order: extras last
        return kd_step(state, teacher, batch, key)

    eval_step = distill.make_eval_step(graphdef, masking, t.seed, axis_name)
    return graphdef, params, train_step, eval_step, (teacher_params,), lambda m: m.bert


def _masking(config: Config, tokenizer) -> mlm.Masking:
    d = config.data
    return mlm.Masking(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), rate=d.mlm_probability,
                       max_predictions=d.max_predictions_per_seq, whole_word=d.whole_word_masking)


def train(config: Config, workdir: str | Path) -> dict[str, float]:
    """Run (or resume) the configured training in `workdir`; returns the final eval metrics."""
    from transformers import AutoTokenizer

    initialize_distributed()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    t = config.train
    parallel = Parallel(config.parallel)
    parallel.check_batch_size(t.batch_size)
    folder = model_folder(teacher_folder(config.distill.teacher) if config.distill.enabled
                          else config.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    ckpts = checkpoint.Checkpoints(workdir / "checkpoints", keep=t.keep_checkpoints)
    resume_step = ckpts.latest()
    labels_file = workdir / "labels.json"
    names = tuple(json.loads(labels_file.read_text())) if resume_step is not None and labels_file.exists() else None
    if config.distill.enabled and config.task == "finetune":  # label ids must mean what they meant to the teacher
        names = BertConfig.from_hf_config(read_config(folder)).labels or names
    data = data_lib.load(config, tokenizer, names)
    if main:
        for report in data.reports:
            print(f"data: {report}", file=sys.stderr)
        print(f"data: {len(next(iter(data.train.values())))} train / {len(next(iter(data.eval.values())))} "
              f"eval examples", file=sys.stderr)

    changes: dict[str, Any] = {}
    num_labels = None
    if config.task == "finetune":
        num_labels = config.model.num_labels or len(data.label_names)
        if num_labels > 1 and len(data.label_names) == num_labels:
            changes["labels"] = data.label_names
        if main:
            labels_file.write_text(json.dumps(list(data.label_names)))
    if config.model.hidden_dropout is not None:
        changes["hidden_dropout_prob"] = config.model.hidden_dropout
    if config.model.attention_dropout is not None:
        changes["attention_probs_dropout_prob"] = config.model.attention_dropout
    tx = optim.make(t)
    graphdef, params, train_step, eval_step, extras, unwrap = build(config, folder, tokenizer, num_labels, changes,
                                                                    tx, parallel.axis_name)

    if resume_step is None:
        host_state = state_lib.create(params, tx, t.seed)
    else:
        abstract = state_lib.abstract(params, tx, t.seed)
        if not parallel.pmap:
            abstract = checkpoint.with_shardings(abstract, parallel.state_shardings(abstract))
        host_state, _, _ = ckpts.restore(abstract, resume_step)
        if main:
            print(f"resuming from step {resume_step} in {workdir}", file=sys.stderr)
    del params
    key = parallel.put_key(jax.device_get(host_state.rng))
    state = parallel.put_state(host_state)
    extras = tuple(parallel.put_state(x) for x in extras)
    del host_state
    train_fn = parallel.compile_train(train_step, state, extras)
    eval_fn = parallel.compile_eval(eval_step)
    batches = data_lib.Batches(data.train, t.batch_size, t.seed, process_index=jax.process_index(),
                               process_count=jax.process_count())
    log = MetricsLog(workdir, None if resume_step is None else resume_step // t.grad_accum, main)
    baseline = majority_baseline(data) if config.task == "finetune" and config.model.num_labels != 1 else None
    if main:
        write_run_record(workdir, config, {"label_names": data.label_names, "resumed_from": resume_step,
                                           "data": [str(r) for r in data.reports],
                                           "majority_class_eval_accuracy": baseline})
        if baseline is not None:
            print(f"data: majority-class accuracy on the eval split: {baseline:.4f}", file=sys.stderr)

    accum = t.grad_accum
    micro = int(jax.device_get(parallel.host_state(state).step))
    position = int(jax.device_get(parallel.host_state(state).data_position))
    total_micro = t.steps * accum
    lr = optim.schedule(t)
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=micro // accum, disable=not (t.progress and main), unit="step",
               dynamic_ncols=True, file=sys.stderr)
    interval, interval_start, interval_steps = None, time.perf_counter(), 0
    eval_metrics: dict[str, float] = {}
    step_compiles = 0
    while micro < total_micro:
        batch = parallel.put_batch(batches[position])
        before = compile_count()
        state, metrics = train_fn(state, batch, key, *extras)
        step_compiles += compile_count() - before
        micro, position = micro + 1, position + 1
        interval = metrics if interval is None else jax.tree.map(jnp.add, interval, metrics)
        interval_steps += 1
        if micro % accum:
            continue
        update = micro // accum
        bar.update(1)
        if update % t.log_every == 0 or update == t.steps:
            values = summarize(interval)
            elapsed = time.perf_counter() - interval_start
            values["learning_rate"] = float(lr(max(update - 1, 0)))
            values["skipped_updates"] = int(jax.device_get(optim.skipped_updates(
                parallel.host_state(state).opt_state)))
            log.write(update, "train", values)
            bar.set_postfix(loss=f"{values['loss']:.4f}",
                            seq_per_s=f"{interval_steps * t.batch_size / max(elapsed, 1e-9):.1f}")
            interval, interval_start, interval_steps = None, time.perf_counter(), 0
        if update % t.eval_every == 0 or update == t.steps:
            eval_metrics = evaluate(eval_fn, state.params, data.eval, parallel, t.batch_size, t.eval_batches)
            log.write(update, "eval", eval_metrics)
            if main:
                bar.write(f"step {update}: eval " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
        if micro % (t.checkpoint_every * accum) == 0 or micro == total_micro:
            ckpts.save(micro, parallel.host_state(state), {"update": update, "position": position})
    bar.close()
    ckpts.wait()
    ckpts.close()
    log.close()
    params = multihost_utils.process_allgather(parallel.host_state(state).params, tiled=True)
    if main:
        save_pretrained(unwrap(nnx.merge(graphdef, params)), workdir / "model", tokenizer=tokenizer)
        record = json.loads((workdir / "run.json").read_text())
        record["train_step_compiles"] = step_compiles  # 1 when the step compiled once (0 if nothing ran)
        (workdir / "run.json").write_text(json.dumps(record, indent=2, default=str))
    return eval_metrics
