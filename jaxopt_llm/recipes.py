"""Tasks × methods behind one seam: the registries, and what a method hands the training loop.

A *task* (what an example is scored on) is a module in `steps/` implementing `steps.task.Task`, with a
`task_from_config(config, tokenizer)` and, when it has options (config keys `<task>.*`), `OPTIONS`. A *method* (how a step trains: clean, adversarial, distill, ...) is a
module with its options dataclass, its steps and a builder `build(context, options) -> Recipe`, exported
as `METHOD`. Each has one line in the tables below; `register_task` / `register` add more at run time.
The loop (`train.fit`) runs any Recipe and never learns which method built it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jaxopt_llm.errors import UserError

if TYPE_CHECKING:
    import optax

_TASKS: dict[str, Any] = {
    "classification": "jaxopt_llm.steps.classify",
    "masked-lm": "jaxopt_llm.steps.mlm",
    "prompt": "jaxopt_llm.steps.prompt",
    "token-classification": "jaxopt_llm.steps.tokens",
    "question-answering": "jaxopt_llm.steps.qa",
}
_METHODS: dict[str, Any] = {
    "clean": "jaxopt_llm.steps.clean",
    "adversarial": "jaxopt_llm.steps.adversarial",
    "distill": "jaxopt_llm.steps.distill",
    "ensemble": "jaxopt_llm.steps.ensemble",
    "lora": "jaxopt_llm.steps.lora",
}


@dataclasses.dataclass
class Recipe:
    """One run, ready for the loop: what is trained, how one step trains it, how it is evaluated and what is
    exported.

    train_step(state, batch, key, aux) -> (state, metrics); eval_step(params, batch, aux) -> metrics, both
    pure, metrics as {name: (sum, count)}. `aux` is passed to every step and never checkpointed (e.g.
    {"teachers": {name: params}}). `export(params)` is the `Bert` written to the run folder's model/;
    `files` are the method's own files for the run folder ({file name: JSON-able value}); `write(params,
    run, exported)` writes any others (LoRA's adapter/). `export` may return a list of models: an ensemble's members,
    written to members/0, members/1, ...
    """

    task: Any
    tx: optax.GradientTransformation
    graphdef: Any
    params: Any
    train_step: Callable
    eval_step: Callable
    export: Callable[[Any], Any]
    aux: Any = None
    files: dict[str, Any] = dataclasses.field(default_factory=dict)
    batches: Callable | None = None  # (arrays, batch_size, seed, **process) -> batches[position]; None: Batches
    members: int | None = None  # a leading member axis on the state and the batches (ensembles)
    write: Callable[[Any, Any, Any], None] | None = None  # write(params, run folder, exported): other files


@dataclasses.dataclass(frozen=True)
class Context:
    """What a builder may use. `load(reference)` returns the `Bert` that a model reference (run folder, HF
    folder, hub id, packaged name) names, with the task's head, the run's label names, dtype and dropout;
    `model` is the config's model reference."""

    task: Any
    tx: optax.GradientTransformation
    seed: int
    model: str
    load: Callable[..., Any]  # load(reference, head=None, seed=None): head None is the task's, seed the run's
    labels: tuple[str, ...] | None = None
    tokenizer: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method. `options`: a frozen dataclass whose fields are the config keys `<name>.*`;
    `commands`: CLI subcommand -> the task it implies (None: the config's task); `base_model(options)`:
    the model the run starts from, whose tokenizer and label names it keeps (None: model.name_or_path);
    `encoders(options, task, tokenizer)`: more data arrays the method's steps read (a prompt teacher's)."""

    name: str
    options: type
    build: Callable[[Context, Any], Recipe]
    help: str
    commands: dict[str, str | None] = dataclasses.field(default_factory=dict)
    base_model: Callable[[Any], str | None] = lambda options: None
    encoders: Callable[[Any, Any, Any], list] = lambda options, task, tokenizer: []

    def __post_init__(self):
        if not self.commands:
            object.__setattr__(self, "commands", {self.name: None})


def register(method: Method) -> Method:
    """Add (or replace) a method; the config's `method=` and the CLI's subcommands see it at once."""
    _METHODS[method.name] = method
    return method


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    from_config: Callable  # (config, tokenizer) -> Task
    options: type | None = None  # frozen dataclass of the config keys `<task>.*`, if any


def register_task(name: str, from_config: Callable, options: type | None = None) -> None:
    """Add a task: `from_config(config, tokenizer) -> Task`; `options`: its config section's dataclass."""
    _TASKS[name] = TaskEntry(from_config, options)


def _task(name: str) -> TaskEntry:
    entry = _TASKS.get(name)
    if entry is None:
        raise UserError(f"task={name!r} is not registered; tasks: {', '.join(_TASKS)}.")
    if isinstance(entry, str):
        module = importlib.import_module(entry)
        entry = _TASKS[name] = TaskEntry(module.task_from_config, getattr(module, "OPTIONS", None))
    return entry


def task_options(name: str) -> type | None:
    """The options dataclass of a task (config keys `<task>.*`), or None."""
    return _task(name).options


def method_names() -> list[str]:
    """The registered methods' names (`method=` values), in registration order."""
    return list(_METHODS)


def task_names() -> list[str]:
    """The registered tasks' names (`task=` values), in registration order."""
    return list(_TASKS)


def get(name: str) -> Method:
    """The registered Method `name` (its module is imported on first use); a UserError lists the names if
    it is not registered."""
    entry = _METHODS.get(name)
    if entry is None:
        raise UserError(f"method={name!r} is not registered; methods: {', '.join(_METHODS)}.")
    if isinstance(entry, str):
        entry = _METHODS[name] = importlib.import_module(entry).METHOD
    return entry


def commands() -> dict[str, tuple[Method, str | None]]:
    """CLI subcommand -> (method, task it implies)."""
    out = {}
    for name in list(_METHODS):
        method = get(name)
        for command, task in method.commands.items():
            out[command] = (method, task)
    return out


def make_task(config, tokenizer):
    """The config's task, built for its data settings and the tokenizer."""
    return _task(config.task).from_config(config, tokenizer)
