"""Stage kinds: a registry, like the Methods of training. A kind says how a stage runs and what it needs;
the runner and the planner never name one.

    register(StageKind("calibrate", run=..., needs_model=True))

Every training command (pretrain, finetune, prompt, adversarial, ensemble, distill) is a kind that trains on
all processes; calibrate, label and export run on process 0. `run(stage, folder, folders, pipeline)` returns
the model reference the stage produced (a run folder, or an artifact for export).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxopt_llm import paths
from jaxopt_llm.pipeline import split as split_lib
from jaxopt_llm.pipeline.spec import DONE, SPLIT_TASKS, Pipeline, PipelineError, Stage, read_json
from jaxopt_llm.runs import write_json


@dataclasses.dataclass(frozen=True)
class StageKind:
    name: str
    run: Callable[[Stage, Path, dict, Pipeline], str]
    trains: bool = False  # every process takes part (jax.distributed); otherwise process 0 alone
    needs_model: bool = False  # the stage must name model="@stage"
    configured: bool = False  # the stage's training config is loaded and checked when planning
    artifact: bool = False  # its result is an exported artifact: no later stage can start from it
    one_process: bool = False  # trains inside on one process: refused when the pipeline runs on several
    check: Callable[[Stage], None] | None = None  # more checks of the stage's fields, before anything runs
    split_tasks: tuple[str, ...] = ("classification",)  # the split tasks (`Split.task`) it works on


_KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    """Add (or replace) a stage kind."""
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, StageKind]:
    """Every stage kind: the training commands (registered on first use), then the others."""
    from jaxopt_llm import recipes

    for name, (_, task) in recipes.commands().items():
        if name not in _KINDS:  # a command that fixes its task (pretrain, prompt) reads classification splits
            _KINDS[name] = StageKind(name, _train, trains=True, configured=True,
                                     split_tasks=("classification",) if task else SPLIT_TASKS)
    return dict(_KINDS)


def get(name: str) -> StageKind:
    found = kinds().get(name)
    if found is None:
        raise PipelineError(f"kind {name!r} is unknown; use one of {', '.join(kinds())}.")
    return found


# ---- how a stage's settings become a config ------------------------------------------------------------
def resolve(value: Any, folders: dict[str, Path]) -> str:
    """A stage value with "@stage" parts replaced by the model each names."""
    return ",".join(model_of(folders[part.strip()[1:]]) if part.strip().startswith("@") else part
                    for part in str(value).split(","))


def model_of(folder: Path) -> str:
    """The model a finished (or running) stage folder stands for."""
    info = read_json(folder / "model.json")
    return str(folder / info["path"]) if info else str(folder)


def config_of(stage: Stage, folders: dict[str, Path], names: list[str], split_task: str = "classification"):
    """The training config of a stage: its file, the implied method / task, the split's files (the split's
    task where the command leaves the task to the config), its model and overrides ("@stage" resolved to
    `folders`)."""
    from jaxopt_llm import config as config_lib
    from jaxopt_llm import recipes

    overrides = [f"{k}={resolve(v, folders)}" for k, v in stage.overrides.items()]
    base = [f"model.name_or_path={resolve(stage.model, folders)}"] if stage.model else []
    command = "finetune" if stage.kind == "label" else stage.kind
    method, task = recipes.commands()[command]
    implied = [f"method={method.name}"] + ([f"task={task}"] if task else [])
    data = folders["data"]
    if split_task != "classification":
        items = [f"task={split_task}", f"data.train_file={split_lib.part(data, 'train', split_task)}"]
        return config_lib.load(stage.config, implied + items + base + overrides)
    items = [f"data.train_file={data / 'train.csv'}", "data.text_column=text", "data.label_column=label"]
    if stage.kind != "pretrain":
        items.append("data.labels=" + ",".join(names))
    return config_lib.load(stage.config, implied + items + base + overrides)


def _names(folders: dict[str, Path]) -> list[str]:
    return json.loads((folders["data"] / "labels.json").read_text())


# ---- the kinds -------------------------------------------------------------------------------------------
def _train(stage: Stage, folder: Path, folders: dict[str, Path], pipeline: Pipeline) -> str:
    from jaxopt_llm.train import train

    train(config_of(stage, folders, _names(folders), pipeline.data.task), folder)
    return str(folder)


def _calibrate(stage: Stage, folder: Path, folders: dict[str, Path], pipeline: Pipeline) -> str:
    from jaxopt_llm.commands import calibrate_run

    parent = paths.Path(resolve(stage.model, folders))
    for item in parent.iterdir():  # the parent's model files; its checkpoints and logs stay behind
        if item.name not in ("checkpoints", "tensorboard", "metrics.jsonl", DONE, "stage.json", "predictions.jsonl",
                             "metrics.json"):
            paths.copy(item, folder / item.name)
    texts, labels = split_lib.texts(folders["data"] / "dev.csv", _names(folders))
    calibrate_run(str(folder), texts, labels)
    return str(folder)


def _export(stage: Stage, folder: Path, folders: dict[str, Path], pipeline: Pipeline) -> str:
    from jaxopt_llm.export import export

    artifact = folder / "artifact"
    paths.rmtree(artifact)  # an interrupted export is redone whole
    texts = split_lib.dev_texts(folders["data"], pipeline.data.task, _names(folders))
    export(resolve(stage.model, folders), artifact, reference_texts=texts[:256], golden_texts=list(pipeline.examples))
    write_json(folder / "model.json", {"path": "artifact"})
    return str(artifact)


def _label(stage: Stage, folder: Path, folders: dict[str, Path], pipeline: Pipeline) -> str:
    from jaxopt_llm import active

    data, names = folders["data"], _names(folders)
    overrides = [f"{k}={resolve(v, folders)}" for k, v in stage.overrides.items()]
    base = [f"model.name_or_path={resolve(stage.model, folders)}"] if stage.model else []
    rounds = active.Rounds.init(folder / "rounds", str(data / "train.csv"), names, stage.config, str(data / "dev.csv"),
                                stage.strategy, overrides=base + overrides)
    gold = active.answers_from_gold(active.read_pool(str(data / "train.csv")), "label")
    rows = active.simulate(rounds, gold, stage.budgets, stage.strategy)
    write_json(folder / "rounds.json", rows)
    latest = rounds.latest_model()
    write_json(folder / "model.json", {"path": str(latest)[len(str(folder)):].lstrip("/")})
    return str(latest)


def _check_label(stage: Stage) -> None:
    if not stage.budgets:
        raise PipelineError(f"stage {stage.name!r} (label) needs budgets=(n1, n2, ...).")


register(StageKind("calibrate", _calibrate, needs_model=True))
register(StageKind("export", _export, needs_model=True, artifact=True, split_tasks=SPLIT_TASKS))
register(StageKind("label", _label, needs_model=True, configured=True, one_process=True, check=_check_label))
