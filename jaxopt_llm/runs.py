"""Run folders: what every training command writes, and what every later step accepts as its model.

    RUN/model/          Hugging Face folder (config.json, model.safetensors, tokenizer) of the result
    RUN/members/<i>/    an ensemble's members instead (and ensemble.json)
    RUN/run.json        the record: config, task, method, label names, versions, devices, baseline, compiles
    RUN/labels.json     label names in id order (classification)
    RUN/metrics.jsonl   one JSON object per logged event
    RUN/checkpoints/    orbax checkpoints of the train state (exact resume)
    RUN/tensorboard/    TensorBoard events
    RUN/<method files>  e.g. prompt.json, temperature.json: what a method adds, read back by prediction

Wherever a model is named (model.name_or_path, distillation teachers, predict, similarity, sweeps, the
Python API) a run folder, an HF folder, a hub id or the packaged MiniLM may be given; `models.resolve`
turns any of them into the HF folder and `RunFolder.of` into the run's record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxopt_llm import paths


def write_json(file, value: Any, indent: int | None = 2) -> None:
    """Write JSON whole: locally a temporary file, fsync, rename; in a bucket one object write. NaN and
    infinities are refused (JSON has none)."""
    paths.write_text(file, json.dumps(value, indent=indent, default=str, allow_nan=False) + "\n")


class RunFolder:
    """A run folder (local or in a bucket): its files' paths, and its record, labels, task, kind and
    members read back. `RunFolder.of(reference)` is the run a model reference names, if it names one."""

    def __init__(self, path: str | os.PathLike):
        self.path = paths.Path(path)

    model = property(lambda self: self.path / "model")
    record_file = property(lambda self: self.path / "run.json")
    labels_file = property(lambda self: self.path / "labels.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tensorboard = property(lambda self: self.path / "tensorboard")

    @classmethod
    def of(cls, reference: str | os.PathLike) -> RunFolder | None:
        """The run folder a model reference names, or None (an HF folder, a hub id, the packaged model)."""
        path = paths.Path(reference if paths.is_remote(reference) else Path(str(reference)).expanduser())
        if (path / "run.json").is_file():
            return cls(path)
        return None

    def member(self, i: int):
        """An ensemble's member i (a Hugging Face folder)."""
        return self.path / "members" / str(i)

    def members(self) -> list:
        """An ensemble run's member folders, in order; [] for a single model."""
        folder = self.path / "members"
        if not folder.is_dir():
            return []
        return [folder / p.name for p in sorted(folder.iterdir(), key=lambda p: int(p.name))
                if p.name.isdigit() and (p / "config.json").is_file()]

    def record(self) -> dict:
        """run.json's contents ({} before the run has written it)."""
        return json.loads(self.record_file.read_text()) if self.record_file.is_file() else {}

    def labels(self) -> tuple[str, ...] | None:
        """Label names in id order, or None (a run without labels)."""
        return tuple(json.loads(self.labels_file.read_text())) if self.labels_file.is_file() else None

    def task(self) -> str | None:
        """The task the run's config trained (None before run.json exists)."""
        return self.record().get("config", {}).get("task")

    def kind(self) -> str:
        """What the run holds: "ensemble" (members/), "prompt" (prompt.json: a cloze classifier on the MLM
        head), "masked-lm" (a pretraining run), "tagger" (token classification), "reader" (extractive QA) or
        "classifier". The one place that decides it."""
        if self.members():
            return "ensemble"
        if (self.path / "prompt.json").is_file():
            return "prompt"
        if self.task() == "masked-lm":
            return "masked-lm"
        if self.task() == "token-classification":
            return "tagger"
        if self.task() == "question-answering":
            return "reader"
        return "classifier"

    def max_length(self) -> int | None:
        """The sequence length the run was trained with (data.max_length), which every path that predicts
        with it cuts texts to; None for a run that records none."""
        value = self.record().get("config", {}).get("data", {}).get("max_length")
        return int(value) if value is not None else None

    def temperature(self) -> float:
        """The calibration temperature fitted for the run (1.0 when none was)."""
        record = self.read("temperature.json")
        return float(record["temperature"]) if record else 1.0

    def read(self, name: str) -> Any:
        """A method file (JSON) of the run, or None."""
        file = self.path / name
        return json.loads(file.read_text()) if file.is_file() else None

    def write(self, name: str, value: Any) -> None:
        write_json(self.path / name, value)
