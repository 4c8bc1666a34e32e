"""The README's distillation table: parameters, eval accuracy, % of the teacher's accuracy retained and
prediction speed-up (same batch of 32 x 64 tokens, jitted forward, median of 20) for finished runs.

    python experiments/distill_table.py runs/tweets_tiny runs/tweets_kd2 runs/tweets_kd3 runs/tweets_scratch2 runs/tweets_scratch3

The first run is the teacher.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxopt_llm.models import bert
from jaxopt_llm.predict import _classify


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"][-1]


def forward_ms(model) -> float:
    graphdef, state = nnx.split(model)
    rng = np.random.RandomState(0)
    ids = rng.randint(1000, model.config.vocab_size, (32, 64)).astype(np.int32)
    mask, types = np.ones_like(ids), np.zeros_like(ids)
    jax.block_until_ready(_classify(graphdef, state, ids, mask, types))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(_classify(graphdef, state, ids, mask, types))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(runs: list[str]) -> None:
    rows = []
    for run in map(Path, runs):
        model = bert.from_pretrained(run / "model", "sequence-classification")
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        record = json.loads((run / "run.json").read_text())
        kd = record["config"].get("distill", {})
        kind = f"{kd['init']}, alpha={kd['alpha']}" if record.get("method") == "distill" else "teacher"
        rows.append((run.name, model.config.num_hidden_layers, params, kind, last_eval(run), forward_ms(model)))
    teacher = rows[0]
    print("| run | layers | parameters | init, loss | accuracy | macro-F1 | % of teacher accuracy | prediction speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, layers, params, kind, ev, ms in rows:
        print(f"| {name} | {layers} | {params / 1e6:.1f} M | {kind} | {ev['accuracy']:.4f} | {ev['f1']:.4f} | "
              f"{100 * ev['accuracy'] / teacher[4]['accuracy']:.1f} % | {teacher[5] / ms:.2f}x ({ms:.0f} ms) |")


if __name__ == "__main__":
    main(sys.argv[1:])
