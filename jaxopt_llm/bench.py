"""`jaxopt-llm bench`: our train steps against transformers' PyTorch BERT + torch.optim.AdamW, same config,
same batch, same process. Prints ms/step, sequences/s, model FLOP/s and the speed ratios.

Model FLOPs are the matmul FLOPs of a standard full train step (forward + backward = 3 x forward, every
layer and, for MLM, the vocabulary projection at every position): the work a reference implementation
does, so FLOP/s compares like with like even though our steps skip part of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    ffn: int = 1024
    vocab: int = 30522
    batch: int = 32
    seq: int = 128
    steps: int = 10
    warmup: int = 2
    mlm_rate: float = 0.15
    max_predictions: int = 20
    dtype: str = "float32"
    adversarial_steps: int = 1  # K of the adversarial step (Madry PGD, L-inf, adversarial loss only)
    student_layers: int = 2  # the distillation row: a student of this depth, the bench model as teacher
    members: int = 5  # the ensemble row: one vmapped step of this many members


def model_flops(c: BenchConfig, task: str) -> float:
    tokens = c.batch * c.seq
    per_layer = 2 * tokens * (4 * c.hidden * c.hidden + 2 * c.hidden * c.ffn) + 2 * 2 * c.batch * c.seq * c.seq * c.hidden
    forward = c.layers * per_layer
    if task == "mlm":
        forward += 2 * tokens * (c.hidden * c.hidden + c.hidden * c.vocab)
    else:
        forward += 2 * c.batch * (c.hidden * c.hidden + c.hidden * 3)
    return 3.0 * forward


def _time(fn: Callable[[], None], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(c: BenchConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    ids = rng.randint(104, c.vocab, (c.batch, c.seq)).astype(np.int32)  # above [CLS] 101, [SEP] 102, [MASK] 103
    ids[:, 0], ids[:, -1] = 101, 102
    special = np.zeros_like(ids)
    special[:, 0] = special[:, -1] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "special_tokens_mask": special, "labels": rng.randint(0, 2, c.batch).astype(np.int32),
            "index": np.arange(c.batch, dtype=np.int32), "weight": np.ones(c.batch, np.float32)}


def _hf_config(c: BenchConfig):
    import transformers

    return transformers.BertConfig(vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=c.layers,
                                   num_attention_heads=c.heads, intermediate_size=c.ffn,
                                   max_position_embeddings=max(512, c.seq), num_labels=2)


def torch_step(c: BenchConfig, task: str) -> Callable[[], None]:
    """transformers BertForSequenceClassification / BertForMaskedLM + torch.optim.AdamW, one step."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cls = transformers.BertForSequenceClassification if task == "classify" else transformers.BertForMaskedLM
    model = cls(_hf_config(c)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = _batch(c)
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor(b["attention_mask"]),
              "token_type_ids": torch.tensor(b["token_type_ids"])}
    if task == "classify":
        labels = torch.tensor(b["labels"], dtype=torch.long)
    else:
        rng = np.random.RandomState(0)
        labels = torch.full_like(ids, -100)
        for r in range(c.batch):
            pos = rng.choice(np.arange(1, c.seq - 1), c.max_predictions, replace=False)
            labels[r, pos] = ids[r, pos]

    def step():
        opt.zero_grad(set_to_none=True)
        model(**inputs, labels=labels).loss.backward()
        opt.step()

    return step


def _bert_config(c: BenchConfig, layers: int | None = None):
    from jaxopt_llm.bert import BertConfig

    return BertConfig(vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=layers or c.layers,
                      num_attention_heads=c.heads, intermediate_size=c.ffn, max_position_embeddings=max(512, c.seq),
                      num_labels=2, dtype=c.dtype)


def _task(c: BenchConfig, name: str):
    from jaxopt_llm.steps.classify import ClassificationTask
    from jaxopt_llm.steps.mlm import Masking, MaskedLMTask

    if name == "mlm":
        return MaskedLMTask(Masking(mask_token_id=103, vocab_size=c.vocab, rate=c.mlm_rate,
                                    max_predictions=c.max_predictions))
    return ClassificationTask()


def _recipe(c: BenchConfig, method: str, task, options=None, layers: int | None = None):
    """A method's recipe from the registry, on a random model of the bench's config (as `train` builds it
    from a checkpoint)."""
    from flax import nnx

    from jaxopt_llm import optim, recipes
    from jaxopt_llm.bert import Bert
    from jaxopt_llm.config import TrainConfig

    entry = recipes.get(method)
    tx = optim.make(TrainConfig(learning_rate=1e-4, warmup_steps=0, steps=1000, weight_decay=0.0))
    ctx = recipes.Context(task=task, tx=tx, seed=0, model="random",
                          load=lambda ref, head=None, seed=None: Bert(_bert_config(c, layers), head or task.head,
                                                                      rngs=nnx.Rngs(seed or 0)))
    return entry.build(ctx, options if options is not None else entry.options())


def _stepper(recipe, c: BenchConfig) -> Callable[[], None]:
    """One jitted train step of the recipe on one device, state donated."""
    from jaxopt_llm import state as state_lib

    step_fn = jax.jit(recipe.train_step, donate_argnums=0)
    holder = {"state": state_lib.create(recipe.params, recipe.tx)}
    batch = _batch(c)
    if recipe.members:  # each member's own batch: (members, batch, ...)
        batch = {k: np.stack([v] * recipe.members) for k, v in batch.items()}
    batch = jax.device_put(batch)
    key = jax.random.key_data(jax.random.key(0))

    def step():
        holder["state"], metrics = step_fn(holder["state"], batch, key, recipe.aux)
        jax.block_until_ready(metrics)

    return step


def kd_parts(c: BenchConfig) -> dict[str, Callable[[], None]]:
    """The distillation step and its budget's parts: the student's clean step, the teacher's forward."""
    from flax import nnx

    from jaxopt_llm.bert import Bert
    from jaxopt_llm.steps.distill import Distillation

    task = _task(c, "classify")
    kd = _recipe(c, "distill", task, Distillation(teacher="random", student_layers=c.student_layers))
    student = _recipe(c, "clean", task, layers=c.student_layers)
    teacher = Bert(_bert_config(c), task.head, rngs=nnx.Rngs(0))
    t_graphdef, t_params = nnx.split(teacher)
    batch = jax.device_put(_batch(c))

    @jax.jit
    def teacher_forward(params, batch):
        model = nnx.merge(t_graphdef, params)
        return task.forward(model, model.embed(batch["input_ids"]), batch, None)

    return {"kd": _stepper(kd, c), "student": _stepper(student, c),
            "teacher": lambda: jax.block_until_ready(teacher_forward(t_params, batch))}


def jax_step(c: BenchConfig, task: str) -> Callable[[], None]:
    """One jitted train step of ours (classify, mlm, adversarial) on one device, built by the registry."""
    from jaxopt_llm.steps.adversarial import Adversary

    if task == "adversarial":
        adv = Adversary(method="pgd", norm="linf", epsilon=0.01, inner_steps=c.adversarial_steps)
        return _stepper(_recipe(c, "adversarial", _task(c, "classify"), adv), c)
    return _stepper(_recipe(c, "clean", _task(c, task)), c)


def run(c: BenchConfig, tasks: tuple[str, ...] = ("classify", "mlm", "adversarial", "distill")) -> list[dict]:
    """Time each task: ours against PyTorch (classify, mlm), or against its budget in our own steps
    (adversarial: (K + 1) clean steps; distill: student step + 1.1 x teacher forward). One row per task."""
    rows = []
    clean_ms = None
    for task in tasks:
        if task == "ensemble":  # its budget: N single clean steps of ours, one after the other
            from jaxopt_llm.steps.ensemble import EnsembleOptions

            ours = _time(_stepper(_recipe(c, "ensemble", _task(c, "classify"), EnsembleOptions(c.members)), c),
                         c.steps, c.warmup) * 1e3
            clean_ms = clean_ms or _time(jax_step(c, "classify"), c.steps, c.warmup) * 1e3
            rows.append({"task": f"ensemble x{c.members}", "ours_ms": ours, "single_ms": clean_ms,
                         "vs_n_single": ours / (c.members * clean_ms), "target": 1.0})
            continue
        if task == "distill":  # its budget: the student's clean step + 1.1 x the teacher's forward pass
            parts = {name: _time(fn, c.steps, c.warmup) * 1e3 for name, fn in kd_parts(c).items()}
            budget = parts["student"] + 1.1 * parts["teacher"]
            rows.append({"task": f"KD {c.layers}->{c.student_layers}", "ours_ms": parts["kd"],
                         "student_ms": parts["student"], "teacher_forward_ms": parts["teacher"],
                         "vs_budget": parts["kd"] / budget, "target": 1.0})
            continue
        ours = _time(jax_step(c, task), c.steps, c.warmup)
        if task == "adversarial":  # its budget is (K + 1) clean steps of ours; PyTorch has no such step
            clean_ms = clean_ms or _time(jax_step(c, "classify"), c.steps, c.warmup) * 1e3
            budget = (c.adversarial_steps + 1) * clean_ms
            rows.append({"task": f"adv K={c.adversarial_steps}", "ours_ms": ours * 1e3, "clean_ms": clean_ms,
                         "vs_k_plus_1_clean": ours * 1e3 / budget, "target": 1.1})
            continue
        theirs = _time(torch_step(c, task), c.steps, c.warmup)
        if task == "classify":
            clean_ms = ours * 1e3
        flops = model_flops(c, task)
        row = {"task": task, "ours_ms": ours * 1e3, "torch_ms": theirs * 1e3, "speedup": theirs / ours,
               "ours_seq_per_s": c.batch / ours, "torch_seq_per_s": c.batch / theirs,
               "ours_model_gflop_per_s": flops / ours / 1e9, "torch_model_gflop_per_s": flops / theirs / 1e9}
        rows.append(row)
    return rows


def print_table(c: BenchConfig, rows: list[dict]) -> None:
    print(f"config: L={c.layers} H={c.hidden} heads={c.heads} FFN={c.ffn} vocab={c.vocab} batch={c.batch}x{c.seq} "
          f"{c.dtype}; {jax.devices()[0].device_kind} x{jax.device_count()}, torch threads={os.cpu_count()}")
    print(f"{'step':<10}{'ours ms':>10}{'torch ms':>10}{'speed-up':>10}{'ours seq/s':>12}{'torch seq/s':>12}"
          f"{'ours GFLOP/s':>14}")
    for r in rows:
        if "vs_n_single" in r:
            print(f"{r['task']:<10}{r['ours_ms']:>10.1f}   = {r['vs_n_single']:.2f} x {c.members} single clean steps "
                  f"({r['single_ms']:.1f} ms each, run one after the other)")
            continue
        if "vs_budget" in r:
            print(f"{r['task']:<10}{r['ours_ms']:>10.1f}   = {r['vs_budget']:.2f} x (student step {r['student_ms']:.1f} ms "
                  f"+ 1.1 x teacher forward {r['teacher_forward_ms']:.1f} ms); target <= {r['target']}")
            continue
        if "torch_ms" not in r:
            print(f"{r['task']:<10}{r['ours_ms']:>10.1f}   = {r['vs_k_plus_1_clean']:.2f} x (K+1) x our clean step "
                  f"({r['clean_ms']:.1f} ms); target <= {r['target']}")
            continue
        print(f"{r['task']:<10}{r['ours_ms']:>10.1f}{r['torch_ms']:>10.1f}{r['speedup']:>9.2f}x"
              f"{r['ours_seq_per_s']:>12.1f}{r['torch_seq_per_s']:>12.1f}{r['ours_model_gflop_per_s']:>14.1f}")
    print(json.dumps({"config": dataclasses.asdict(c), "rows": rows}))
