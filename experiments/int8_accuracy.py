"""int8 against float32 on a labelled test split: accuracy, macro-F1 and ECE of three exported artifacts of one
run (float32; weight-only int8 on the jax.export functions; int8-dynamic on ONNX Runtime), their weights' size,
and the share of texts whose predicted class changes against float32.

    python experiments/int8_accuracy.py runs/tweets/calibrated-* --texts runs/tweets/data-*/test.csv

Prints one JSON object. The bound: accuracy within 0.5 point of float32, else a mode is not the default (neither
is: float32 is).
"""

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np

from jaxopt_llm import metrics
from jaxopt_llm.export import export
from jaxopt_llm.serving.artifact import Artifact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a classifier run folder")
    parser.add_argument("--texts", required=True, help="labelled csv with text and label columns")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    args = parser.parse_args()
    with open(args.texts, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [r[args.text_column] for r in rows]
    out, probs = {}, {}
    modes = {"float32": ({}, "jax", "weights.safetensors"),
             "int8": ({"quantize": "int8"}, "jax", "weights.safetensors"),
             "int8-dynamic": ({"format": "onnx", "quantize": "int8-dynamic"}, "onnxruntime", "model.onnx")}
    with tempfile.TemporaryDirectory() as work:
        for mode, (options, backend, weights) in modes.items():
            art = export(args.run, Path(work) / mode, **options)
            loaded = Artifact.load(art, backend=backend)
            labels = np.asarray([loaded.labels.index(r[args.label_column]) for r in rows])
            probs[mode] = loaded.predict(texts)[0]
            scores = metrics.classification(probs[mode], labels)
            out[mode] = {"accuracy": round(float(scores["accuracy"]), 4), "macro_f1": round(float(scores["f1"]), 4),
                         "ece": round(float(scores["ece"]), 4), "weights_file": weights,
                         "weights_bytes": (art / weights).stat().st_size}
    for mode in ("int8", "int8-dynamic"):
        out[mode]["accuracy_change_points"] = round(100 * (out[mode]["accuracy"] - out["float32"]["accuracy"]), 2)
        out[mode]["changed_predictions"] = float(np.mean(probs[mode].argmax(-1) != probs["float32"].argmax(-1)))
        out[mode]["max_probability_difference"] = float(np.abs(probs[mode] - probs["float32"]).max())
    out["texts"] = len(texts)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
