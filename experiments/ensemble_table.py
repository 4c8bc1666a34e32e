"""The README's ensemble / calibration table: one model, one model + temperature, a 5-member ensemble (+
temperature) and the ensemble distilled into one student, scored on the same 400 held-out tweets.

    jaxopt-llm finetune --config experiments/configs/tweets_tiny.py --workdir runs/tweets_tiny
    jaxopt-llm ensemble --config experiments/configs/tweets_ensemble_tiny.py --workdir runs/tweets_ens5
    jaxopt-llm distill --config experiments/configs/tweets_distill_tiny.py distill.teacher=runs/tweets_ens5 \
        distill.student_layers=6 train.learning_rate=5e-5 --workdir runs/tweets_ens_kd
    python experiments/ensemble_table.py runs/tweets_tiny runs/tweets_ens5 runs/tweets_ens_kd

The student has all 6 layers and starts from the ensemble's first member (distill.init=teacher-layers); it
learns the 5 members' mean distribution (alpha 0.5, T 2) for the same 300 steps on the same tweets.

Temperatures are fitted on 1,000 other tweets (not among the 4,000 the runs saw): runs/calibration_tweets.csv,
written here. The reliability diagrams go to docs/reliability.png.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np

from jaxopt_llm import calibration, inference
from jaxopt_llm import config as config_lib
from jaxopt_llm import data as data_lib
from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm.assets import tweets_csv_path
from jaxopt_llm.commands import calibrate_run
from jaxopt_llm.models.bert import load_tokenizer
from jaxopt_llm.steps.task import DataNeeds

CONFIG = Path(__file__).parent / "configs" / "tweets_tiny.py"


def calibration_file(texts_seen: set[str], out: Path, n: int = 1000) -> Path:
    """n labelled tweets whose text is not among those the runs trained or were evaluated on."""
    rows = list(csv.DictReader(tweets_csv_path().read_text(encoding="utf-8", errors="replace").splitlines()))
    fresh = [r for r in rows if r["text"] not in texts_seen and r["text"].strip()]
    picked = [fresh[i] for i in np.random.default_rng(7).permutation(len(fresh))[:n]]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["sentiment", "text"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(picked)
    return out


def score(probs, labels) -> dict:
    m = metrics_lib.classification(probs, labels)
    m.pop("confusion")
    return m


def main(single: str, ensemble: str, student: str) -> None:
    config = config_lib.load(CONFIG)
    tokenizer = load_tokenizer(single)
    data = data_lib.load(config.data, tokenizer, DataNeeds(labels=True), names=("negative", "neutral", "positive"))
    texts, labels = list(data.texts["eval"]), data.eval["labels"]
    seen = set(data.texts["train"]) | set(texts)
    calib = calibration_file(seen, Path("runs/calibration_tweets.csv"))
    calib_data = data_lib.load(config_lib.load(None, [f"data.train_file={calib}", f"data.eval_file={calib}",
                                                      "data.label_column=sentiment", "data.max_length=64"]).data,
                               tokenizer, DataNeeds(labels=True), names=("negative", "neutral", "positive"))
    rows, curves = [], {}
    for name, run, calibrate in (("one model", single, False), ("one model + temperature", single, True),
                                 ("5-member ensemble", ensemble, False), ("ensemble + temperature", ensemble, True),
                                 ("ensemble distilled into one", student, False)):
        temperature = 1.0
        if calibrate:  # writes RUN/temperature.json, which prediction applies
            record = calibrate_run(run, list(calib_data.texts["eval"]), calib_data.eval["labels"])
            temperature = record["temperature"]
        probs = inference.load(run).probs(texts)
        if calibrate:  # kept, but out of the way of the uncalibrated rows
            (Path(run) / "temperature.json").replace(Path(run) / "temperature.fitted.json")
        rows.append({"model": name, "temperature": temperature, **score(probs, labels)})
        curves[name] = (probs, labels)
        print(json.dumps(rows[-1]), file=sys.stderr)
    calibration.reliability_diagram({k: curves[k] for k in ("one model", "one model + temperature",
                                                             "5-member ensemble")}, "docs/reliability.png")
    print("| model | T | accuracy | macro-F1 | NLL | ECE | Brier |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['temperature']:.2f} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['nll']:.4f} | "
              f"{r['ece']:.4f} | {r['brier']:.4f} |")
    Path("runs/ensemble_table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
