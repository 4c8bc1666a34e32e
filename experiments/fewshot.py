"""The few-shot curve of the README: head fine-tuning vs prompt fine-tuning vs a 3-pattern ensemble, all from the
MLM-adapted MiniLM (runs/tweets_mlm), for k = 0, 8, 32, 128 labelled tweets per class and 3 seeds, evaluated on
the same 400 held-out tweets (those of tweets_tiny.py).

    python experiments/fewshot.py [--out runs/fewshot] [--ks 0,8,32,128] [--seeds 0,1,2]

Runs that finished are not run again. Writes OUT/results.json, prints the table, and plots docs/fewshot.png.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jaxopt_llm import config as config_lib
from jaxopt_llm import data as data_lib
from jaxopt_llm import inference
from jaxopt_llm.cli import compile_cache
from jaxopt_llm.metrics import macro_f1
from jaxopt_llm.models.bert import load_tokenizer
from jaxopt_llm.steps.prompt import Prompt
from jaxopt_llm.steps.task import DataNeeds
from jaxopt_llm.train import train

CONFIG = Path(__file__).parent / "configs" / "tweets_prompt_tiny.py"
PATTERNS = ["{text} It was [MASK].", "{text} All in all, it was [MASK].", "Just [MASK]! {text}"]
VERBALIZER = "negative=bad;neutral=okay;positive=great"


def scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    predicted = probs.argmax(-1)
    confusion = np.zeros((probs.shape[-1],) * 2)
    np.add.at(confusion, (labels, predicted), 1)
    return {"accuracy": float((predicted == labels).mean()), "f1": macro_f1(confusion)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/fewshot")
    parser.add_argument("--ks", default="0,8,32,128")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plot", default="docs/fewshot.png")
    args = parser.parse_args()
    compile_cache()  # the runs share their programs: each compiles once, later runs load it
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    done = {(r["method"], r["k"], r["seed"]) for r in results}
    base = config_lib.load(CONFIG)
    tokenizer = load_tokenizer(base.model.name_or_path)
    eval_data = data_lib.load(base.data, tokenizer, DataNeeds(labels=True), num_labels=None,
                              names=Prompt.parse(PATTERNS[0], VERBALIZER).labels)
    texts, labels = list(eval_data.texts["eval"]), eval_data.eval["labels"]

    def record(method, k, seed, metrics):
        results.append({"method": method, "k": k, "seed": seed, **{m: metrics[m] for m in ("accuracy", "f1")}})
        (out / "results.json").parent.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(json.dumps(results[-1]), file=sys.stderr)

    for k in map(int, args.ks.split(",")):
        for seed in map(int, args.seeds.split(",")):
            if k == 0:
                if seed == 0 and ("prompt", 0, 0) not in done:  # zero-shot has no seed
                    prompts = [Prompt.parse(p, VERBALIZER) for p in PATTERNS]
                    members = inference.prompt_ensemble(base.model.name_or_path, prompts, max_length=64).member_probs(texts)
                    record("prompt", 0, 0, scores(members[0], labels))
                    record("ensemble", 0, 0, scores(members.mean(0), labels))
                continue
            common = [f"data.per_class={k}", f"train.seed={seed}", "train.progress=false"]
            if ("head", k, seed) not in done:
                config = config_lib.load(CONFIG, [*common, "task=classification"])
                record("head", k, seed, train(config, out / f"head_k{k}_s{seed}"))
            runs = []
            for i, pattern in enumerate(PATTERNS):
                run = out / f"prompt{i}_k{k}_s{seed}"
                metrics = train(config_lib.load(CONFIG, [*common, f"prompt.pattern={pattern}"]), run)
                runs.append(run)
                if i == 0 and ("prompt", k, seed) not in done:
                    record("prompt", k, seed, metrics)
            if ("ensemble", k, seed) not in done:
                ensemble = inference.prompt_ensemble(runs=runs)
                config = config_lib.load(CONFIG, common)
                few = data_lib.load(config.data, tokenizer, DataNeeds(labels=True), names=ensemble.labels, seed=seed)
                ensemble.fit_weights(list(few.texts["train"]), few.train["labels"])  # PET: accuracy on the k-shot set
                record("ensemble", k, seed, scores(ensemble.probs(texts), labels))
    table(results, args.plot)


def table(results: list[dict], plot: str) -> None:
    ks = sorted({r["k"] for r in results})
    print("| k per class | head fine-tuning | prompt fine-tuning | 3-pattern ensemble |")
    print("|---|---|---|---|")
    lines = {}
    for k in ks:
        cells = []
        for method in ("head", "prompt", "ensemble"):
            acc = [r["accuracy"] for r in results if r["method"] == method and r["k"] == k]
            f1 = [r["f1"] for r in results if r["method"] == method and r["k"] == k]
            if acc:
                lines.setdefault(method, []).append((k, np.mean(acc), np.std(acc)))
                cells.append(f"{np.mean(acc):.3f} ± {np.std(acc):.3f} (F1 {np.mean(f1):.3f})")
            else:
                cells.append("–")
        print(f"| {k} | " + " | ".join(cells) + " |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for method, points in lines.items():
        x = [max(k, 1) for k, _, _ in points]
        ax.errorbar(x, [m for _, m, _ in points], yerr=[s for _, _, s in points], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks([1, 8, 32, 128], ["0", "8", "32", "128"])
    ax.set_xlabel("labelled tweets per class")
    ax.set_ylabel("accuracy (400 held-out tweets)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot)


if __name__ == "__main__":
    main()
