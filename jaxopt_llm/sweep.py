"""Jitted evaluation sweeps: many models and settings, one compiled program.

The parameters of several runs (or of every checkpoint of one run) are stacked on a leading model axis;
one jitted function evaluates a batch for every model (vmap over that axis), every temperature of a grid
(vmap over T) and every epsilon of a robustness grid (vmap over epsilon, PGD on the word embeddings), and
returns (sum, count) metrics; one pass over the eval data fills the whole table. When the stack does not
fit, the model axis runs in chunks of one fixed size through the same compiled program.

Metrics per point: accuracy, macro-F1, NLL, ECE (15 bins) and Brier per (model, temperature); robust
accuracy per (model, epsilon). Token classifiers (`evaluate_tokens`): loss, token accuracy and entity
precision / recall / F1 per model, counted on device; readers (`evaluate_answers`): exact match and F1 per
model, from every model's span logits joined over a question's windows on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm.errors import UserError
from jaxopt_llm.steps.adversarial import Adversary, attack


@dataclasses.dataclass
class Stack:
    """Models of one architecture and label set on a leading axis: `names` (one per model), `steps`
    (checkpoint step, or None for an exported model)."""

    graphdef: nnx.GraphDef
    params: object
    names: list[str]
    steps: list[int | None]
    labels: tuple[str, ...]
    tokenizer: object
    max_length: int  # the models' sequence length: eval data is cut to it
    kind: str = "classifier"  # classifier | tagger | reader (`inference.KINDS`)
    options: dict = dataclasses.field(default_factory=dict)  # a reader's qa.json (stride, max_answer_length, ...)


def checkpoint_params(run: str, template, every: int | None = None) -> list[tuple[int, object]]:
    """(step, params) of a run's checkpoints (every N-th update when `every`), restored into the shapes of
    `template` (the run's exported model). Runs whose state holds a plain model (finetune, adversarial,
    prompt) qualify."""
    from jaxopt_llm import checkpoint, optim
    from jaxopt_llm import state as state_lib
    from jaxopt_llm.config import TrainConfig
    from jaxopt_llm.runs import RunFolder

    folder = RunFolder.of(run)
    if folder is None or not checkpoint.has_steps(folder.checkpoints):
        raise UserError(f"{run!r} has no checkpoints to sweep (a run folder with checkpoints/ is needed).")
    record = folder.record()
    if record.get("method") not in ("clean", "adversarial"):
        raise UserError(f"{run!r} is a {record.get('method')} run: checkpoint sweeps take runs whose state is the "
                         "model itself (finetune, prompt, adversarial); sweep its exported model instead.")
    train = TrainConfig(**{k: v for k, v in record["config"]["train"].items() if k in TrainConfig.__dataclass_fields__})
    tx = optim.make(train)
    abstract = state_lib.abstract(nnx.state(template), tx)
    manager = checkpoint.Checkpoints(folder.checkpoints, keep=10**6)
    out = []
    try:
        for step in sorted(manager.manager.all_steps()):
            update = step // train.grad_accum
            if every and update % every and step != max(manager.manager.all_steps()):
                continue
            state, _, _ = manager.restore(abstract, step)
            out.append((update, state.params))
    finally:
        manager.close()
    return out


def stack(models: Sequence[str], checkpoints: str | None = None) -> Stack:
    """The listed runs / model folders (each its exported model), or, with `checkpoints` ("all" or
    "every:N"), every checkpoint of each listed run, on one model axis. They must share an architecture, a
    label set and the sequence length they cut texts to."""
    from jaxopt_llm import inference

    every = None
    if checkpoints:
        every = int(checkpoints.split(":", 1)[1]) if checkpoints.startswith("every:") and \
            checkpoints.split(":", 1)[1].isdigit() else None
        if checkpoints != "all" and not every:
            raise UserError(f"--checkpoints {checkpoints!r}: use all or every:N (N >= 1).")
    loaded = [inference.load(ref) for ref in models]
    first = loaded[0]
    for model in loaded:
        if model.kind not in ("classifier", "tagger", "reader") or model.artifact:
            raise UserError(f"{model.reference!r} is a {'exported ' if model.artifact else ''}{model.kind} model; "
                            "sweeps evaluate single classifiers, token classifiers and readers from run or model "
                            "folders (name an ensemble's members one by one).")
        if model.kind != first.kind:
            raise UserError(f"{model.reference!r} is a {model.kind} but {first.reference!r} a {first.kind}: a sweep "
                            "stacks models of one task.")
    metrics_lib.check_same([m.engine.state for m in loaded], [m.reference for m in loaded], UserError)
    for model in loaded[1:]:
        if model.labels != first.labels:
            raise UserError(f"{model.reference!r} has labels {list(model.labels)} but {first.reference!r} has "
                             f"{list(first.labels)}: a sweep stacks runs of one label set.")
        if model.max_length != first.max_length:
            raise UserError(f"{model.reference!r} cuts texts to {model.max_length} tokens but {first.reference!r} "
                             f"to {first.max_length}: a sweep stacks runs of one sequence length; sweep them apart.")
    names, steps, params = [], [], []
    for model in loaded:
        found = checkpoint_params(model.reference, model.engine.model, every) if checkpoints else [
            (None, model.engine.state)]
        for step, p in found:
            names.append(model.reference)
            steps.append(step)
            params.append(p)
    stacked = metrics_lib.stack(params, names, host=True)  # host: chunks slice freely
    return Stack(first.engine.graphdef, stacked, names, steps, first.labels, first.tokenizer, first.max_length,
                 first.kind, dict(first.options))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "norm"))
def sweep_batch(graphdef, params_m, batch, temperatures_k, epsilons_e, steps: int, norm: str = "linf"):
    """Sums of one batch for every model (M), temperature (K) and epsilon (E):
    nll (M, K), brier (M, K), bins (M, K, 3, 15), confusion (M, C, C), count (), robust (M, E)."""
    from jaxopt_llm.steps.classify import ClassificationTask

    task = ClassificationTask()
    valid = batch["weight"] > 0
    weight = batch["weight"]

    def one_model(p):
        model = nnx.merge(graphdef, p)
        emb = model.embed(batch["input_ids"])
        logits = task.forward(model, emb, batch, None)

        def at_temperature(t):
            probs = jax.nn.softmax(logits / t, -1)
            nll = -jnp.sum(jnp.where(valid, jnp.take_along_axis(jax.nn.log_softmax(logits / t, -1),
                                                                batch["labels"][:, None], -1)[:, 0], 0.0))
            brier = jnp.sum(jnp.where(valid, metrics_lib.brier(probs, batch["labels"]), 0.0))
            return nll, brier, metrics_lib.bin_sums(probs, batch["labels"], weight)

        nll, brier, bins = jax.vmap(at_temperature)(temperatures_k)
        confusion = metrics_lib.confusion_matrix(logits, batch["labels"], weight)

        def robust(eps):
            adv = Adversary(method="pgd", norm=norm, epsilon=0.0, inner_steps=steps, init="zero")

            def objective(q, delta):
                out = task.forward(nnx.merge(graphdef, q), emb + delta, batch, None)
                return jnp.sum(jnp.where(valid, -jnp.take_along_axis(jax.nn.log_softmax(out, -1),
                                                                     batch["labels"][:, None], -1)[:, 0], 0.0))

            delta = attack(objective, p, emb.shape, batch["attention_mask"], adv, jax.random.key(0), eps).delta
            attacked = task.forward(model, emb + delta, batch, None)
            return jnp.sum(jnp.where(valid, (jnp.argmax(attacked, -1) == batch["labels"]).astype(jnp.float32), 0.0))

        robust_e = jax.vmap(robust)(epsilons_e) if epsilons_e.shape[0] else jnp.zeros((0,), jnp.float32)
        return nll, brier, bins, confusion, robust_e

    nll, brier, bins, confusion, robust = jax.vmap(one_model)(params_m)
    return {"nll": nll, "brier": brier, "bins": bins, "confusion": confusion, "robust": robust,
            "count": jnp.sum(weight)}


def evaluate(s: Stack, arrays: dict, temperatures: Sequence[float] = (1.0,), epsilons: Sequence[float] = (),
             steps: int = 5, norm: str = "linf", batch_size: int = 32, chunk: int | None = None) -> list[dict]:
    """Every point of the sweep: one row per (model, temperature) with accuracy, macro-F1, NLL, ECE, Brier,
    and one per (model, epsilon) with robust accuracy. The model axis runs in chunks of `chunk` (same
    compiled program: the last chunk is padded with copies)."""
    from jaxopt_llm.data import eval_batches

    m = len(s.names)
    temps = np.asarray(temperatures, np.float32)
    eps = np.asarray(epsilons, np.float32)
    totals = None
    for params, keep in _chunks(s, chunk):
        part = None
        for batch in eval_batches(arrays, batch_size):
            sums = jax.device_get(sweep_batch(s.graphdef, params, batch, temps, eps, steps, norm))
            part = sums if part is None else jax.tree.map(np.add, part, sums)
        part = {k: (v if k == "count" else v[:keep]) for k, v in part.items()}
        totals = part if totals is None else {k: (v if k == "count" else np.concatenate([totals[k], v]))
                                              for k, v in part.items()}
    rows, n = [], float(totals["count"])
    for i in range(m):
        confusion = totals["confusion"][i]
        accuracy = float(np.trace(confusion) / n)
        f1 = metrics_lib.macro_f1(confusion)
        for k, t in enumerate(temperatures):
            rows.append({"model": s.names[i], "step": s.steps[i], "temperature": float(t), "accuracy": accuracy,
                         "f1": f1, "nll": float(totals["nll"][i, k] / n), "brier": float(totals["brier"][i, k] / n),
                         "ece": metrics_lib.ece_from_bins(totals["bins"][i, k])})
        for e, value in enumerate(epsilons):
            rows.append({"model": s.names[i], "step": s.steps[i], "epsilon": float(value),
                         "robust_accuracy": float(totals["robust"][i, e] / n)})
    return rows


def _chunks(s: Stack, chunk: int | None):
    """(params of `chunk` models, how many of them are real) over the model axis; the last chunk is padded
    with copies of the last model, so every chunk runs the same compiled program."""
    m = len(s.names)
    chunk = chunk or m
    for start in range(0, m, chunk):
        index = np.minimum(np.arange(start, start + chunk), m - 1)
        yield jax.tree.map(lambda x: np.asarray(x)[index], s.params), min(chunk, m - start)


@functools.partial(jax.jit, static_argnames=("graphdef", "task"))
def _token_sums(graphdef, params_m, batch, task):
    """Every model's (sum, count) metrics of one batch (`TokenClassificationTask.eval_metrics`), (M, ...)."""
    def one_model(p):
        model = nnx.merge(graphdef, p)
        return task.eval_metrics(task.forward(model, model.embed(batch["input_ids"]), batch, None), batch, None)

    return jax.vmap(one_model)(params_m)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _span_logits(graphdef, params_m, batch):
    """Every model's start and end logits of one batch of windows, (M, b, 2, t)."""
    from jaxopt_llm.steps.qa import QuestionAnsweringTask

    task = QuestionAnsweringTask()

    def one_model(p):
        model = nnx.merge(graphdef, p)
        return task.forward(model, model.embed(batch["input_ids"]), batch, None)

    return jax.vmap(one_model)(params_m)


def evaluate_tokens(s: Stack, arrays: dict, task, batch_size: int = 32, chunk: int | None = None) -> list[dict]:
    """One row per model of a token-classifier stack: loss, token accuracy, entity precision / recall / F1
    (strict, as seqeval counts them) on `arrays` (`data.tagged.align`); `task` is the bound
    `TokenClassificationTask` (labels and scheme)."""
    from jaxopt_llm.data import eval_batches

    rows, at = [], 0
    for params, keep in _chunks(s, chunk):
        total = None
        for batch in eval_batches(arrays, batch_size):
            sums = jax.device_get(_token_sums(s.graphdef, params, batch, task))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        for i in range(keep):
            row = task.summarize(jax.tree.map(lambda x: x[i], total))
            rows.append({"model": s.names[at], "step": s.steps[at], **row})
            at += 1
    return rows


def evaluate_answers(s: Stack, questions: Sequence, batch_size: int = 32, chunk: int | None = None,
                     **options) -> list[dict]:
    """One row per model of a reader stack: exact match and F1 (percent, the SQuAD script's) on `questions`
    (`data.squad`), each model's windows joined as `predict qa` joins them; `options` (stride,
    max_answer_length, no_answer) default to the first model's qa.json."""
    from jaxopt_llm import answers, packing
    from jaxopt_llm.metrics import squad_scores

    options = {"stride": 32, "max_answer_length": 30, "no_answer": False, **s.options, **options}
    answers.check_stride(options["stride"], s.max_length)
    contexts = [q.context for q in questions]
    rows_, example_of, offsets = packing.qa_windows(s.tokenizer, [q.question for q in questions], contexts,
                                                    s.max_length, options["stride"])
    gold = {q.id: [a for a, _ in q.answers] for q in questions}
    rows, at = [], 0
    for params, keep in _chunks(s, chunk):
        logits = []  # per batch (M, b, 2, t)
        for start in range(0, len(example_of), batch_size):
            part = {k: v[start:start + batch_size] for k, v in rows_.items()}
            n = len(part["input_ids"])
            padded = packing.pad_rows(part, packing.power_of_two(n, batch_size))
            logits.append(np.asarray(_span_logits(s.graphdef, params, padded))[:, :n])
        logits_m = np.concatenate(logits, 1)
        for i in range(keep):
            found = answers.from_windows(contexts, example_of, list(logits_m[i]), offsets,
                                         options["max_answer_length"], options["no_answer"])
            scores = squad_scores({q.id: r["answer"] for q, r in zip(questions, found)}, gold)
            rows.append({"model": s.names[at], "step": s.steps[at], "exact_match": scores["exact_match"],
                         "f1": scores["f1"], "questions": len(questions)})
            at += 1
    return rows


def auto_chunk(s: Stack, batch_size: int, seq: int, fraction: float = 0.5) -> int:
    """How many models fit at once: parameters and activations of one model against a share of the free
    memory (the device's bytes_limit where known, else the host's available memory)."""
    per_model = sum(x[0].size * x.dtype.itemsize for x in jax.tree.leaves(s.params))
    config = nnx.merge(s.graphdef, jax.tree.map(lambda x: x[0], s.params)).config
    activations = 4 * batch_size * seq * config.hidden_size * config.num_hidden_layers * 12
    free = None
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if free is None:
        try:
            free = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
        except (OSError, StopIteration):
            free = 8 << 30
    return max(1, min(len(s.names), int(fraction * free // (per_model + activations))))


def write(rows: list[dict], out: str) -> None:
    """JSON (.json) or CSV (.csv) of every point."""
    path = Path(out)
    if path.suffix == ".csv":
        import csv

        keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "model", k != "step", k))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(rows, indent=1))


def plot(rows: list[dict], out: str, metric: str = "accuracy") -> None:
    """The metric against checkpoint step (checkpoint sweeps) or the grid value, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    robust = metric == "robust_accuracy"
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name and (("epsilon" in r) == robust)]
        if robust:
            x, label = [r["epsilon"] for r in mine], "epsilon"
        elif any(r["step"] is not None for r in mine):
            mine = [r for r in mine if r["temperature"] == mine[0]["temperature"]]
            x, label = [r["step"] for r in mine], "checkpoint (update)"
        else:
            x, label = [r["temperature"] for r in mine], "temperature"
        ax.plot(x, [r[metric] for r in mine], marker="o", label=Path(name).name)
    ax.set_xlabel(label if rows else "")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
