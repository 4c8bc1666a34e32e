"""Where a train step's time goes: the BERT-large classification train step of `jaxopt-llm bench`'s compile rows
(unrolled, scanned, `scan_unroll`), warmed up, then one step traced with `jax.profiler`; its XLA operations'
durations summed by kind (matmuls, dynamic slices, dynamic-update-slices, fills, copies, the rest) and by phase
(forward, backward, the rest: optimiser, loss; read from each operation's op_name in the compiled HLO, and
"unattributed" where XLA made an operation without one).

    PYTHONPATH=. python experiments/step_profile.py --layers 24 --batch 2
    PYTHONPATH=. python experiments/step_profile.py --layers 6 --batch 8 --variants scanned

Durations are summed over XLA's threads, so they can add up to more than the step's wall time. XLA:CPU
reports its operations only with `--xla_cpu_enable_xprof_traceme=true` in XLA_FLAGS before JAX starts: the
script adds it to XLA_FLAGS when run as a script. Prints a table per variant and one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import resource
import tempfile
import time

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
if __name__ == "__main__" and TRACE_FLAG not in os.environ.get("XLA_FLAGS", ""):  # read when JAX starts, below
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACE_FLAG}".strip()

import jax  # noqa: E402

from jaxopt_llm import bench, heap  # noqa: E402

KINDS = ("matmul", "dynamic-slice", "dynamic-update-slice", "fill", "copy", "loop control", "other")


def kind(op: str) -> str:
    """What an operation of XLA:CPU's compiled program does, from its name (fusions are named after their ops)."""
    if op.startswith(("ynn_fusion", "dot", "convolution", "onednn", "xnn_fusion")):
        return "matmul"
    if "dynamic-update-slice" in op:
        return "dynamic-update-slice"
    if "dynamic-slice" in op:
        return "dynamic-slice"
    if op.startswith("wrapped_broadcast"):
        return "fill"
    if op.startswith("copy"):
        return "copy"
    if op.startswith("while"):
        return "loop control"
    return "other"


def phases(hlo_text: str) -> dict[str, str]:
    """Each instruction of a compiled program -> forward | backward | rest | unattributed, from its op_name: JAX
    names the backward pass's operations transpose(...), the forward's jvp(...)."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if m:
            name = re.search(r'op_name="([^"]*)"', line)
            if name is None:
                out[m[1]] = "unattributed"
            else:
                out[m[1]] = "backward" if "transpose(" in name[1] else "forward" if "jvp(" in name[1] else "rest"
    return out


def trace_events(folder: str) -> list[dict]:
    """The complete events of the Perfetto trace that `jax.profiler.trace(folder, create_perfetto_trace=True)` wrote."""
    files = sorted(glob.glob(os.path.join(folder, "**", "*.json.gz"), recursive=True))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {folder}")
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def profile(c, layers: int, warmup: int, **changes) -> dict:
    """One traced step of `bench.compile_step(c, layers, **changes)` after `warmup` steps: its wall ms and the
    ms of its operations, in all, by kind, by phase and the ten longest, and the page faults it took."""
    program = bench.compile_step(c, layers, **changes)
    phase_of, one = phases(program.compiled.as_text()), program.step
    # the first steps grow the heap that later steps reuse (jaxopt_llm.heap); page faults would be timed as the
    # zero fills' work, so warm-up goes on (up to 10 more steps) until a step faults no page in
    for done in range(warmup + 10):
        faults = _faults()
        one()
        if done + 1 >= warmup and _faults() - faults == 0:
            break
    with tempfile.TemporaryDirectory(prefix="step-profile-") as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            faults, start = _faults(), time.perf_counter()
            one()
            wall, faults = time.perf_counter() - start, _faults() - faults
        events = trace_events(folder)
    ops = collections.Counter()
    for e in events:
        if e["name"] in phase_of:
            ops[e["name"]] += e.get("dur", 0) / 1e3
    if not ops:
        raise RuntimeError(f"the trace has no operations of the program: run with {TRACE_FLAG} in XLA_FLAGS "
                           "before JAX starts (the script sets it when run as a script)")
    by_kind, by_phase = dict.fromkeys(KINDS, 0.0), dict.fromkeys(("forward", "backward", "rest", "unattributed"), 0.0)
    for op, ms in ops.items():
        by_kind[kind(op)] += ms
        by_phase[phase_of[op]] += ms
    return {"wall_ms": wall * 1e3, "page_faults": faults, "ops_ms": sum(ops.values()), "by_kind": by_kind,
            "by_phase": by_phase, "top": [[op, ms] for op, ms in ops.most_common(10)]}


def _faults() -> int:
    """Minor page faults of this process so far (pages the kernel mapped in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--variants", default="unrolled,scanned",
                        help=f"comma-separated: {', '.join(bench.COMPILE_VARIANTS)}")
    parser.add_argument("--warmup", type=int, default=4, help="steps before the traced one")
    parser.add_argument("--hidden", type=int, default=None, help="another width (heads of 64, FFN 4x; tests)")
    parser.add_argument("--vocab", type=int, default=None, help="another vocabulary (tests)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(bench.COMPILE_VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(bench.COMPILE_VARIANTS)}")
    heap.keep_freed_memory()  # as every jaxopt-llm command does, before the first JAX computation
    model = {}
    if args.hidden:
        model.update(hidden_size=args.hidden, num_attention_heads=max(1, args.hidden // 64),
                     intermediate_size=4 * args.hidden)
    if args.vocab:
        model["vocab_size"] = args.vocab
    c = bench.BenchConfig(batch=args.batch, seq=args.seq)
    result = {"layers": args.layers, "batch": args.batch, "seq": args.seq, "variants": {}}
    for name in args.variants.split(","):
        r = result["variants"][name] = profile(c, args.layers, args.warmup, **model, **bench.COMPILE_VARIANTS[name])
        print(f"{name}: step {r['wall_ms']:.0f} ms traced ({r['page_faults']} page faults); operations "
              f"{r['ops_ms']:.0f} ms summed over threads")
        print("  by kind:  " + ", ".join(f"{k} {v:.0f}" for k, v in r["by_kind"].items()))
        print("  by phase: " + ", ".join(f"{k} {v:.0f}" for k, v in r["by_phase"].items()))
        print("  longest:  " + ", ".join(f"{op} {ms:.0f}" for op, ms in r["top"][:5]), flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
