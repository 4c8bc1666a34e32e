"""The optimiser update alone, ours against optax's and PyTorch's on the same parameter shapes, in one process,
timed in interleaved rounds (median): `optim.make` (clip + AdamW + the non-finite guard, one elementwise
expression per parameter), optax's `clip_by_global_norm -> adamw` chain without any guard, and
`torch.nn.utils.clip_grad_norm_` + `torch.optim.AdamW` (its default and `fused=True`). The JAX updates are
jitted with the parameters and state donated, as in a train step; every gradient is 1e-3.

    PYTHONPATH=. python experiments/optimizer_bench.py                      # the bench model: 11 M parameters
    PYTHONPATH=. python experiments/optimizer_bench.py --large --layers 6   # BERT-large width: 108 M parameters

Needs torch (the test extra). Prints one line per optimiser: ms per update and our speed relative to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import torch
import transformers
from flax import nnx

from jaxopt_llm import bench, heap, optim
from jaxopt_llm.config import TrainConfig
from jaxopt_llm.models.bert import Bert, BertConfig


def jax_update(tx: optax.GradientTransformation, params, grads) -> Callable[[], None]:
    """One donated, jitted update of a copy of `params`, as a no-argument callable."""
    def apply(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    apply = jax.jit(apply, donate_argnums=(0, 1))
    held = {"params": jax.tree.map(jnp.copy, params), "state": tx.init(params)}

    def step():
        held["params"], held["state"] = apply(held["params"], held["state"], grads)
        jax.block_until_ready(held["params"])

    return step


def torch_update(model: torch.nn.Module, max_norm: float, **adamw) -> Callable[[], None]:
    parameters = list(model.parameters())
    for p in parameters:
        p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.01, **adamw)

    def step():
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        opt.step()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="BERT-large width (H=1024, FFN=4096, 16 heads)")
    parser.add_argument("--layers", type=int, default=None, help="encoder layers (default: 4, or 24 with --large)")
    parser.add_argument("--hidden", type=int, default=None, help="the bench model's width, changed (tests)")
    parser.add_argument("--vocab", type=int, default=None, help="the bench model's vocabulary, changed (tests)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.large:
        config = BertConfig.large(num_hidden_layers=args.layers or 24, num_labels=2, max_position_embeddings=512)
    else:  # the bench's model, as `jaxopt-llm bench` builds it
        config = bench._bert_config(bench.resized(bench.BenchConfig(), hidden=args.hidden, vocab=args.vocab,
                                                  layers=args.layers))
    _, params = nnx.split(Bert(config, "sequence-classification", rngs=nnx.Rngs(0)))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    hf = transformers.BertForSequenceClassification(config.to_hf_config())
    sizes = {"ours": sum(x.size for x in jax.tree.leaves(params)), "torch": sum(p.numel() for p in hf.parameters())}
    cfg = TrainConfig(learning_rate=1e-4, steps=1000)
    fns = {
        "ours (optim.make: clip + AdamW + guard)": jax_update(optim.make(cfg), params, grads),
        "optax chain, no guard": jax_update(optim.reference(cfg), params, grads),
        "torch AdamW (default)": torch_update(hf, cfg.max_grad_norm),
        "torch AdamW (fused=True)": torch_update(hf, cfg.max_grad_norm, fused=True),
    }
    times = bench._time_rounds(fns, args.steps, warmup=2)
    ours = times["ours (optim.make: clip + AdamW + guard)"]
    print(f"parameters: ours {sizes['ours']:,}, torch {sizes['torch']:,}; {jax.devices()[0].platform}, "
          f"torch threads {args.threads}; {bench.processor()}")
    for name, t in times.items():
        print(f"{name:42s} {t * 1e3:8.1f} ms   ours is {t / ours:.2f}x its speed")
    return {"parameters": sizes, "ms": {name: t * 1e3 for name, t in times.items()}}


if __name__ == "__main__":
    heap.keep_freed_memory()  # as every jaxopt-llm command does, before the first JAX computation
    main()
