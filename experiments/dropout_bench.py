"""Dropout masks from the counter hash (`BertConfig.dropout_rng="hash"`, the default) against threefry bits
(`"threefry"`, the earlier default), in one process: the bench model's train steps timed in
interleaved rounds (median), then the compile time of a BERT-large classification train step, unrolled and
scanned, for each.

    PYTHONPATH=. python experiments/dropout_bench.py                       # classification and MLM steps, 24 layers
    PYTHONPATH=. python experiments/dropout_bench.py --tasks classify --compile-layers 0

Prints one line per step and per compiled program: ms (or s) with the hash and with threefry, and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses

from jaxopt_llm import bench, heap

RNGS = ("hash", "threefry")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="classify,mlm", help="train steps to time: classify, mlm")
    parser.add_argument("--steps", type=int, default=10, help="interleaved rounds timed (after 2 warm-up rounds)")
    parser.add_argument("--compile-layers", type=int, default=24, help="BERT-large depth compiled; 0: none")
    parser.add_argument("--compile-batch", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="the bench model's depth, changed (tests)")
    parser.add_argument("--hidden", type=int, default=None, help="the bench model's width, changed (tests)")
    parser.add_argument("--vocab", type=int, default=None, help="the bench model's vocabulary, changed (tests)")
    parser.add_argument("--batch", type=int, default=None, help="the bench model's batch, changed (tests)")
    args = parser.parse_args(argv)
    c = bench.resized(bench.BenchConfig(), hidden=args.hidden, vocab=args.vocab, layers=args.layers,
                      batch=args.batch)
    result: dict = {"step_ms": {}, "compile_s": {}}
    for task in args.tasks.split(","):
        steps = {rng: bench.jax_step(dataclasses.replace(c, dropout_rng=rng), task) for rng in RNGS}
        seconds = bench._time_rounds(steps, args.steps, 2)
        result["step_ms"][task] = ms = {rng: seconds[rng] * 1e3 for rng in RNGS}
        print(f"train step {task:8s}  hash {ms['hash']:8.1f} ms  threefry {ms['threefry']:8.1f} ms  "
              f"threefry / hash {ms['threefry'] / ms['hash']:.2f}", flush=True)
    if args.compile_layers:
        for name in ("unrolled", "scanned"):
            s = {rng: bench.compile_seconds(dataclasses.replace(c, batch=args.compile_batch, dropout_rng=rng),
                                            args.compile_layers, **bench.COMPILE_VARIANTS[name]) for rng in RNGS}
            result["compile_s"][name] = s
            print(f"compile {name:8s} ({args.compile_layers} layers)  hash {s['hash']:6.1f} s  "
                  f"threefry {s['threefry']:6.1f} s  threefry / hash {s['threefry'] / s['hash']:.2f}", flush=True)
    return result


if __name__ == "__main__":
    heap.keep_freed_memory()
    main()
