"""Every classification metric, once: the same functions serve device sums (inside jitted eval steps, added
over batches and devices) and host arrays (sweeps, calibration, the pipeline). A leaf: numpy and jax only.

For probabilities p (n, c), labels y (n,) and per-example weights w (n,):
    accuracy = sum w 1[argmax p = y] / sum w
    NLL      = -sum w log p[y] / sum w
    Brier    = sum w sum_c (p_c - 1[c = y])^2 / sum w        (multi-class Brier score, 0 .. 2)
    ECE      = sum_b (n_b / n) |accuracy_b - confidence_b|    over 15 equal-width bins of max_c p_c
    macro-F1 = mean over the classes present (as label or prediction) of 2 tp / (2 tp + fp + fn)
A confusion matrix is indexed [true label, predicted label].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BINS = 15


# ---- sums: jittable, (b, ...) -> sums that add over batches and devices -------------------------------------
def confusion_matrix(scores_bc: jax.Array, labels_b: jax.Array, weight_b: jax.Array) -> jax.Array:
    """(c, c) float32 counts [true label, predicted label] of scores (logits or probabilities), rows weighted."""
    c = scores_bc.shape[-1]
    pairs = labels_b * c + jnp.argmax(scores_bc, -1)
    return jnp.zeros(c * c, jnp.float32).at[pairs].add(weight_b).reshape(c, c)


def bin_sums(probs_bc: jax.Array, labels_b: jax.Array, weight_b: jax.Array, bins: int = BINS) -> jax.Array:
    """(3, bins) float32: per confidence bin (k-1)/B < confidence <= k/B, [weighted count, sum of confidence,
    sum of correct]. `ece_from_bins` turns their sum over batches into the ECE."""
    confidence = jnp.max(probs_bc, -1)
    correct = (jnp.argmax(probs_bc, -1) == labels_b).astype(jnp.float32)
    index = jnp.clip(jnp.ceil(confidence * bins).astype(jnp.int32) - 1, 0, bins - 1)
    rows = jnp.stack([jnp.ones_like(confidence), confidence, correct]) * weight_b
    return jnp.zeros((3, bins), jnp.float32).at[:, index].add(rows)


def brier(probs_bc: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Per example sum_c (p_c - onehot_c)^2 (b,)."""
    onehot = jax.nn.one_hot(labels_b, probs_bc.shape[-1], dtype=jnp.float32)
    return jnp.sum(jnp.square(probs_bc.astype(jnp.float32) - onehot), -1)


# ---- from sums -----------------------------------------------------------------------------------------------
def ece_from_bins(sums: Any) -> float:
    """The ECE of summed `bin_sums` (3, bins); NaN when they count nothing."""
    count, confidence, correct = np.asarray(sums, np.float64)
    total = count.sum()
    if total == 0:
        return float("nan")
    used = count > 0
    return float(np.sum(np.abs(correct[used] - confidence[used])) / total)


def macro_f1(confusion: Any) -> float:
    """Mean F1 over the classes that occur (as label or prediction) in `confusion` [true, predicted]."""
    c = np.asarray(confusion, np.float64)
    tp, fp, fn = np.diag(c), c.sum(0) - np.diag(c), c.sum(1) - np.diag(c)
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    return float(np.mean(2 * tp[present] / denominator[present])) if present.any() else float("nan")


# ---- host arrays ---------------------------------------------------------------------------------------------
def classification(probs: Any, labels: Any, bins: int = BINS) -> dict[str, Any]:
    """accuracy, f1 (macro), nll, ece, brier and the confusion matrix (a list of rows) of probabilities
    (n, c) against labels (n,): the formulas of the eval step, on the host."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probabilities of shape {probs.shape} and labels of shape {labels.shape}: need (n, c) "
                         "and (n,).")
    n, c = probs.shape
    weight = np.ones(n, np.float32)
    confusion = np.zeros((c, c))
    np.add.at(confusion, (labels, probs.argmax(-1)), 1)
    sums = bin_sums(jnp.asarray(probs, jnp.float32), jnp.asarray(labels), jnp.asarray(weight), bins)
    return {"accuracy": float(np.mean(probs.argmax(-1) == labels)),
            "f1": macro_f1(confusion),
            "nll": float(-np.mean(np.log(np.clip(probs[np.arange(n), labels], 1e-30, None)))),
            "ece": ece_from_bins(sums),
            "brier": float(np.mean(np.sum((probs - np.eye(c)[labels]) ** 2, -1))),
            "confusion": confusion.astype(int).tolist()}


def calibration_bins(probs: Any, labels: Any, bins: int = BINS) -> np.ndarray:
    """`bin_sums` of host probabilities (n, c), as float64 (3, bins): for reliability diagrams."""
    probs = np.asarray(probs, np.float32)
    return np.asarray(bin_sums(jnp.asarray(probs), jnp.asarray(labels), jnp.ones(len(probs), jnp.float32), bins),
                      np.float64)


# ---- member axes ---------------------------------------------------------------------------------------------
def check_same(trees: Sequence[Any], names: Sequence[str] | None = None,
               error: type[Exception] = ValueError) -> None:
    """Pytrees of one structure and shapes, else one `error` naming the first two that differ."""
    names = list(names) if names is not None else [f"member {i}" for i in range(len(trees))]
    first = trees[0]
    shapes = jax.tree.map(np.shape, first)
    for tree, name in zip(trees[1:], names[1:]):
        if jax.tree.structure(tree) != jax.tree.structure(first) or jax.tree.map(np.shape, tree) != shapes:
            raise error(f"{name!r} and {names[0]!r} differ in architecture (layers, sizes or heads); members "
                        "stacked on one axis must share it.")


def stack(trees: Sequence[Any], names: Sequence[str] | None = None, *, host: bool = False,
          error: type[Exception] = ValueError) -> Any:
    """Pytrees of one structure and shapes stacked on a new leading member axis (jax arrays; numpy with
    `host`, so chunks of the axis slice without a device copy). Trees that differ are one `error` naming the
    two (by `names`)."""
    check_same(trees, names, error)
    if host:
        return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
