"""The README's active-learning curves: simulated rounds on the tweets (pool = the 3,600 training tweets of
tweets_tiny.py, their gold labels answering the queries), accuracy on the same 400 held-out tweets after 50,
100, 200 and 400 labels, for random, entropy, breaking-ties and BALD (MC dropout) queries, 3 seeds.

    python experiments/active_learning.py [--out runs/al] [--strategies random,entropy,breaking-ties,bald]

Every round fine-tunes MiniLM afresh on all labels so far (train.steps=60, batch 16). Rounds that finished are
not run again. Writes OUT/results.json, prints the table and plots docs/active_learning.png.
"""

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from jaxopt_llm import active
from jaxopt_llm import config as config_lib
from jaxopt_llm import data as data_lib
from jaxopt_llm.cli import compile_cache
from jaxopt_llm.models.bert import load_tokenizer
from jaxopt_llm.steps.task import DataNeeds

CONFIG = Path(__file__).parent / "configs" / "tweets_tiny.py"
LABELS = ["negative", "neutral", "positive"]
ROUND = ["train.steps=60", "train.batch_size=16", "train.warmup_steps=6", "train.eval_every=60",
         "train.log_every=20", "train.checkpoint_every=60"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/al")
    parser.add_argument("--strategies", default="random,entropy,breaking-ties,bald")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="50,100,200,400")
    parser.add_argument("--plot", default="docs/active_learning.png")
    args = parser.parse_args()
    compile_cache()  # the runs share their programs: each compiles once, later runs load it
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = config_lib.load(CONFIG)
    data = data_lib.load(config.data, load_tokenizer(config.model.name_or_path), DataNeeds(labels=True),
                         names=tuple(LABELS))
    pool, eval_file = out / "pool.jsonl", out / "eval.csv"
    pool.write_text("".join(json.dumps({"id": f"t{i}", "text": t, "gold": LABELS[int(y)]}) + "\n"
                            for i, (t, y) in enumerate(zip(data.texts["train"], data.train["labels"]))))
    with eval_file.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([t, LABELS[int(y)]] for t, y in zip(data.texts["eval"], data.eval["labels"]))
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    budgets = [int(b) for b in args.budgets.split(",")]
    for strategy in args.strategies.split(","):
        for seed in map(int, args.seeds.split(",")):
            if any(r["strategy"] == strategy and r["seed"] == seed for r in results):
                continue
            rounds = active.Rounds.init(out / f"{strategy}_s{seed}", str(pool), LABELS, str(CONFIG), str(eval_file),
                                        strategy, seed, [*ROUND, f"train.seed={seed}"])
            gold = active.answers_from_gold(active.read_pool(pool), "gold")
            for row in active.simulate(rounds, gold, budgets, strategy):
                results.append({"strategy": strategy, "seed": seed, **row})
                print(json.dumps(results[-1]), file=sys.stderr)
            results_file.write_text(json.dumps(results, indent=1))
    table(results, budgets, args.plot)


def table(results: list[dict], budgets: list[int], plot: str) -> None:
    strategies = list(dict.fromkeys(r["strategy"] for r in results))
    print("| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " | median seconds per round |")
    print("|---|" + "---|" * (len(budgets) + 1))
    curves = {}
    for s in strategies:
        cells = []
        for b in budgets:
            acc = [r["accuracy"] for r in results if r["strategy"] == s and r["labelled"] == b]
            sd = float(np.std(acc, ddof=1)) if len(acc) > 1 else 0.0  # sample standard deviation over seeds
            curves.setdefault(s, []).append((b, np.mean(acc) if acc else np.nan, sd))
            cells.append(f"{np.mean(acc):.3f} ± {sd:.3f}" if acc else "–")
        seconds = [r["seconds"] for r in results if r["strategy"] == s and r["seconds"] is not None]
        print(f"| {s} | " + " | ".join(cells) + f" | {np.median(seconds):.0f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for s, points in curves.items():
        ax.errorbar([b for b, _, _ in points], [m for _, m, _ in points], yerr=[d for _, _, d in points], marker="o",
                    capsize=3, label=s)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("labelled tweets")
    ax.set_ylabel("accuracy (400 held-out tweets)")
    ax.set_title("mean ± sd over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot)


if __name__ == "__main__":
    main()
