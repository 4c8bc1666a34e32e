"""What a model family declares: its config and module classes and its Hugging Face key table.

A family's `params.py` builds one `Family`; `jaxopt_llm.models` keys them by HF `model_type`. The generic
converter (`models/convert.py`) reads and writes checkpoints of any family from these fields alone.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a cache key of the converter
class Family:
    """model_type: the HF `model_type`. config: a frozen dataclass with `from_hf_config(dict, **changes)`,
    `to_hf_config(architectures)` and `max_tokens`. module: the NNX module, `module(config, task, rngs=)`,
    implementing the encoder protocol (embed, encode, heads, classify_logits, mlm_logits). table: rows
    (HF key without `prefix`, our parameter path, transpose); "{i}" is a layer, "{part}" one of `parts`
    (the thirds of the fused qkv). task_tables: rows that replace the table's rows for the same path in one
    task (e.g. RoBERTa's classification head reuses our pooler), keyed by the task, or by "task/variant" where
    `variant(config)` names which of a task's key layouts a config uses (DeBERTa's two masked-LM names).
    prefix: the base model's key prefix in task checkpoints; head_keys: keys that never carry it; derived: keys
    without parameters of their own (buffers, tied decoders); heads: our top-level modules a checkpoint may
    lack; architectures: task -> HF class."""

    model_type: str
    config: type
    module: type
    table: tuple[tuple[str, str, bool], ...]
    prefix: str
    head_keys: tuple[str, ...]
    derived: tuple[str, ...]
    heads: tuple[str, ...]
    architectures: dict[str, str]
    parts: tuple[str, str, str] = ("query", "key", "value")
    task_tables: dict[str, tuple[tuple[str, str, bool], ...]] = dataclasses.field(default_factory=dict)
    variant: Callable[[Any], str] | None = None

    def rows(self, task: str, config: Any = None) -> list[tuple[str, str, bool]]:
        """The table for one task (and config): its task rows first, then the shared rows for every other path."""
        key = task if self.variant is None or config is None else f"{task}/{self.variant(config)}"
        own = list(self.task_tables.get(key, self.task_tables.get(task, ())))
        paths = {ours for _, ours, _ in own}
        return own + [row for row in self.table if row[1] not in paths]

    def rules(self, task: str, config: Any = None) -> list[tuple[re.Pattern, str, bool]]:
        parts = "|".join(map(re.escape, self.parts))
        out = []
        for hf, ours, transpose in self.rows(task, config):
            regex = re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{part\}", f"(?P<part>{parts})")
            out.append((re.compile(f"^{regex}$"), ours, transpose))
        return out

    def normalise(self, key: str) -> str:
        """An HF key without the base prefix, with TF-era LayerNorm names (gamma / beta) renamed."""
        key = key[len(self.prefix):] if key.startswith(self.prefix) else key
        return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))

    def task_of(self, architectures: list[str]) -> str | None:
        by_class = {cls: task for task, cls in self.architectures.items()}
        return next((by_class[n] for n in architectures if n in by_class), None)

    def describe(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "tasks": sorted(self.architectures)}
