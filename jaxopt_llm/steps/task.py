"""The Task protocol: what an example is scored on. Every method's step (clean, adversarial,
distillation, ...) takes a Task; nothing else in the package branches on the kind of task.

A batch is a dict of arrays with a leading example axis: input_ids, attention_mask, token_type_ids
(b, t) int32; weight (b,) float32 (0 for padding rows of the last eval batch); index (b,) int32 (the
example's row); plus what the task reads (labels, special_tokens_mask, word_ids, next_sentence_label).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

from jaxopt_llm.steps.common import Metrics


class Prepared(NamedTuple):
    """What a step feeds the model: `input_ids` (b, t) to embed (masked for MLM), the task's `extra`
    (e.g. masked positions and their labels; None for classification), the dropout key, and `token_mask`
    (b, t): the real tokens of input_ids, where a perturbation may go (None: batch["attention_mask"])."""

    input_ids: jax.Array
    extra: Any
    dropout_key: jax.Array | None
    token_mask: jax.Array | None = None


class Targets(NamedTuple):
    """The distributions a task is scored on: `logits` (..., c) float32, integer `labels` (...) and
    `where` (...) bool. Distillation, SMART and accuracy read these."""

    logits: jax.Array
    labels: jax.Array
    where: jax.Array


@dataclasses.dataclass(frozen=True)
class DataNeeds:
    labels: bool  # rows need a label column
    word_ids: bool = False  # whole-word masking
    next_sentence: bool = False  # sentence pairs with an is-next label
    label_names: tuple[str, ...] | None = None  # the label order the task fixes (a verbalizer's), else the data's
    encode: Any = None  # (texts, text pairs or None, max_length) -> the task's own arrays, added to the rows
    load: Any = None  # (data config, tokenizer, names=, seed=) -> Data: the task reads its own files


class Task(Protocol):
    name: str  # "classification", "masked-lm", ...
    head: str  # the `Bert` task (heads) the model needs: "sequence-classification", "masked-lm", ...
    data: DataNeeds

    def prepare(self, batch: dict, key: jax.Array | None) -> Prepared:
        """Draws what the step needs from the step key (MLM masks) and splits off the dropout key."""

    def forward(self, model, embeddings: jax.Array, batch: dict, extra: Any, *, deterministic: bool = True,
                dropout_key: jax.Array | None = None, collect: dict | None = None) -> Any:
        """The task's outputs from word embeddings (b, t, d); the last layer runs only at the positions
        read, unless `collect` (a dict for every layer's hidden states and attention maps) is given."""

    def targets(self, outputs: Any, batch: dict, extra: Any) -> Targets: ...

    def loss(self, outputs: Any, batch: dict, extra: Any) -> tuple[jax.Array, Metrics]:
        """(this device's share of the global mean loss, for gradients; {name: (sum, count)} metrics)."""

    def eval_metrics(self, outputs: Any, batch: dict, extra: Any) -> Metrics:
        """The loss metrics plus what `summarize` needs (a confusion matrix for macro-F1)."""

    def summarize(self, sums: Metrics) -> dict[str, float]:
        """Host-side means of summed metrics, and derived ones (macro-F1)."""

    def baseline(self, train: dict[str, np.ndarray], eval: dict[str, np.ndarray]) -> dict[str, float]:
        """The number to beat on the eval split (majority-class accuracy), or {}."""

    def files(self) -> dict[str, Any]:
        """What the task adds to a run folder ({file name: JSON}), read back by prediction (e.g. prompt.json)."""
