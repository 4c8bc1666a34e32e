"""Every checkpoint of a run x a temperature grid in one jitted sweep, against the same evaluations done one by
one (one model and one temperature per call, in the same process, so compiled programs are reused): the
wall times, the largest difference between the two, and the learning-curve plot.

    python experiments/sweep_timing.py runs/tweets/finetune-* --data runs/tweets/data-*/test.csv \
        --plot docs/sweep_learning_curve.png
"""

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from jaxopt_llm import config as config_lib
from jaxopt_llm import data as data_lib
from jaxopt_llm import sweep
from jaxopt_llm.models.bert.params import load_tokenizer
from jaxopt_llm.steps.task import DataNeeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--data", required=True, help="csv with text and label columns")
    parser.add_argument("--temperatures", default="0.5,1,2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--plot", default="sweep_learning_curve.png")
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    start = time.perf_counter()
    stack = sweep.stack([args.run], "all")
    config = config_lib.load(None, [f"data.train_file={args.data}", f"data.eval_file={args.data}",
                                    "data.max_length=64"])
    arrays = data_lib.load(config.data, load_tokenizer(stack.folder), DataNeeds(labels=True),
                           names=stack.labels).eval
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    together = sweep.evaluate(stack, arrays, temperatures, (), 0, "linf", args.batch_size)
    swept = time.perf_counter() - start
    start = time.perf_counter()
    alone = []
    for i in range(len(stack.names)):
        one = dataclasses.replace(stack, params=jax.tree.map(lambda x: x[i:i + 1], stack.params),
                                  names=stack.names[i:i + 1], steps=stack.steps[i:i + 1])
        for t in temperatures:
            alone += sweep.evaluate(one, arrays, (t,), (), 0, "linf", args.batch_size)
    separate = time.perf_counter() - start
    key = lambda r: (r["step"], r["temperature"])  # noqa: E731
    a, b = sorted(together, key=key), sorted(alone, key=key)
    diff = max(abs(x[m] - y[m]) for x, y in zip(a, b) for m in ("accuracy", "nll", "ece"))
    sweep.plot(together, args.plot, "accuracy")
    n = len(next(iter(arrays.values())))
    print(f"{len(stack.names)} checkpoints x {len(temperatures)} temperatures on {n} texts (loading {loaded:.1f} s): "
          f"one sweep {swept:.1f} s, one by one {separate:.1f} s ({separate / swept:.2f}x); largest difference "
          f"{diff:.2e}")
    for r in a:
        print(f"step {r['step']:>5}  T={r['temperature']:<4g} accuracy {r['accuracy']:.4f}  macro-F1 {r['f1']:.4f}  "
              f"NLL {r['nll']:.4f}  ECE {r['ece']:.4f}")
    print(json.dumps({"sweep_s": swept, "one_by_one_s": separate, "max_diff": diff, "plot": args.plot,
                      "points": len(a), "steps": sorted(set(np.asarray([r["step"] for r in a]).tolist()))}))


if __name__ == "__main__":
    main()
