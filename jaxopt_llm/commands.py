"""Command bodies that write into run folders, shared by the command line and the pipeline's stages:
`calibrate_run` (temperature.json) and `stack_runs` (an ensemble run folder). Each checks its arguments and
computes everything first, and writes whole files last: a failed command leaves the folder as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxopt_llm import calibration, inference, paths
from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm.errors import UserError
from jaxopt_llm.runs import RunFolder, write_json


def calibrate_run(reference: str, texts: Sequence[str], labels: np.ndarray, plot: str | None = None) -> dict:
    """Fit the temperature of a run (single, prompt or ensemble) on held-out texts and labels; write
    temperature.json (and a reliability diagram before / after) into the run folder. Prediction and export
    apply it from then on: probabilities are softmax(logits / T), logits the run's uncalibrated scores."""
    run = RunFolder.of(reference)
    if run is None:
        raise UserError(f"{reference!r} is not a run folder (run.json): calibration writes temperature.json into one.")
    labels = np.asarray(labels)
    if len(texts) != len(labels) or not len(texts):
        raise UserError(f"{len(texts)} texts and {len(labels)} labels: calibration needs one label per text, and "
                        "at least one.")
    if plot and not Path(plot).expanduser().resolve().parent.is_dir():
        raise UserError(f"--plot {plot!r}: its folder does not exist; create it or pass another path.")
    model = inference.load(reference, temperature=1.0)
    if model.kind in ("masked-lm", "encoder") or len(model.labels) < 2:
        raise UserError(f"{reference!r} is a {model.kind} with no class probabilities to calibrate.")
    if labels.min() < 0 or labels.max() >= len(model.labels):
        raise UserError(f"labels must be ids 0..{len(model.labels) - 1} of {list(model.labels)}.")
    logits = model.logits(texts)
    probs = calibration.softmax(logits)
    t = calibration.fit_temperature(logits, labels)
    after = calibration.softmax(logits, t)
    record = {"temperature": t, "examples": int(len(labels)), "before": _summary(probs, labels),
              "after": _summary(after, labels)}
    drawn = None
    if plot:  # drawn beside its place, renamed once the temperature is written: all or nothing
        target = Path(plot).expanduser()
        drawn = target.with_name(f".{target.stem}.tmp{target.suffix}")
        calibration.reliability_diagram({"before": (probs, labels), f"after (T = {t:.2f})": (after, labels)},
                                        str(drawn))
    try:
        run.write("temperature.json", record)  # a failure above leaves the run uncalibrated
    except BaseException:
        if drawn is not None:
            drawn.unlink(missing_ok=True)
        raise
    if drawn is not None:
        drawn.replace(target)
    return record


def _summary(probs: np.ndarray, labels: np.ndarray) -> dict:
    m = metrics_lib.classification(probs, labels)
    return {k: m[k] for k in ("accuracy", "nll", "ece", "brier")}


def stack_runs(runs: Sequence[str], out: str) -> Path:
    """An ensemble run folder at `out` from classification runs of one architecture and label set: their
    models under members/, and the sequence length they were trained with (they must agree)."""
    from jaxopt_llm.models import resolve

    target = paths.Path(out)
    if target.exists():
        raise UserError(f"--out {out!r} exists; pass a new folder.")
    lengths = {str(r): RunFolder.of(r).max_length() if RunFolder.of(r) is not None else None for r in runs}
    known = {v for v in lengths.values() if v is not None}
    if len(known) > 1:
        raise UserError(f"the runs were trained on different sequence lengths ({lengths}); members of one ensemble "
                        "must cut texts alike.")
    engine, _ = inference.ensemble_engine(runs)  # one architecture, one label set: else one error
    max_length = known.pop() if known else engine.max_length
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for i, ref in enumerate(runs):
            shutil.copytree(resolve(ref), tmp / "members" / str(i))
        names = list(engine.model.config.label_names)
        write_json(tmp / "labels.json", names)
        write_json(tmp / "ensemble.json", {"members": len(runs), "combine": "mean-prob",
                                           "sources": [str(r) for r in runs]})
        write_json(tmp / "run.json", {"config": {"task": "classification", "data": {"max_length": max_length}},
                                      "task": "classification", "method": "ensemble", "label_names": names,
                                      "sources": [str(r) for r in runs]})
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
