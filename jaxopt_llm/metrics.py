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


# ---- entities (token classification) -----------------------------------------------------------------

SCHEMES = {"IOB2": ("B", "I"), "IOBES": ("B", "I", "E", "S")}  # the prefixes each scheme's tags may carry
_PREFIX_CODE = {"O": 0, "B": 1, "I": 2, "E": 3, "S": 4}


def split_tag(tag: str) -> tuple[str, str]:
    """"B-PER" -> ("B", "PER"); "O" -> ("O", "")."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def entities(tags, scheme: str = "IOB2") -> list[tuple[str, int, int]]:
    """The entities (type, start, end exclusive) of one tag sequence, as seqeval finds them in strict mode:
    IOB2 -- B-X followed by I-X*, a stray I-X is no entity; IOBES -- S-X, or B-X (I-X)* E-X, a chain that
    does not end in E-X is no entity."""
    inside_prefixes = ("I",) if scheme == "IOB2" else ("I", "E")
    parts = [split_tag(t) for t in tags] + [("O", "")]
    out, i = [], 0
    while i < len(tags):
        prefix, kind = parts[i]
        if prefix not in ("B", "S"):
            i += 1
            continue
        j = i + 1
        while (prefix != "S" and parts[j][0] in inside_prefixes and parts[j][1] == kind
               and parts[j - 1][0] in ("B", "I")):
            j += 1
        last = parts[j - 1][0]
        if scheme == "IOB2" or last in ("E", "S"):
            out.append((kind, i, j))
        i = j
    return out


def entity_scores(true_tags, pred_tags, scheme: str = "IOB2") -> dict[str, float]:
    """Micro precision, recall and F1 over exact (type, span) matches of every sequence (seqeval's
    `f1_score(..., mode="strict", scheme=...)`), with the counts behind them."""
    tp = n_pred = n_true = 0
    for t, p in zip(true_tags, pred_tags):
        gold, pred = set(entities(t, scheme)), set(entities(p, scheme))
        tp, n_pred, n_true = tp + len(gold & pred), n_pred + len(pred), n_true + len(gold)
    return prf(tp, n_pred, n_true)


def prf(tp: float, n_pred: float, n_true: float) -> dict[str, float]:
    """Precision, recall and F1 from true positives and the predicted and true counts (0 where a count is
    0), with the counts."""
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "tp": float(tp),
            "predicted": float(n_pred), "true": float(n_true)}


def tag_tables(labels, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(prefix code, type index) of each label id, with one more row for "no tag" (ignored positions):
    O 0, B 1, I 2, E 3, S 4; type -1 for O."""
    kinds = sorted({split_tag(t)[1] for t in labels if t != "O"})
    prefix = np.asarray([_PREFIX_CODE[split_tag(t)[0]] for t in labels] + [0], np.int32)
    kind = np.asarray([kinds.index(split_tag(t)[1]) if t != "O" else -1 for t in labels] + [-1], np.int32)
    return prefix, kind


def _spans(tags_bt, prefix_c, kind_c, scheme: str):
    """(is an entity start, type, last index) per position of word-level tag ids (b, t); ids < 0 are O."""
    n = prefix_c.shape[0] - 1
    ids = jnp.where(tags_bt < 0, n, tags_bt)
    pre, kind = jnp.asarray(prefix_c)[ids], jnp.asarray(kind_c)[ids]
    prev_pre = jnp.pad(pre[:, :-1], ((0, 0), (1, 0)))
    prev_kind = jnp.pad(kind[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    inside_pre = (pre == 2) if scheme == "IOB2" else ((pre == 2) | (pre == 3))
    inside = inside_pre & ((prev_pre == 1) | (prev_pre == 2)) & (kind == prev_kind)
    t = tags_bt.shape[1]
    breaks = jnp.where(inside, t, jnp.arange(t)[None, :])
    after = jax.lax.cummin(breaks, axis=1, reverse=True)  # first non-inside position at or after i
    last = jnp.concatenate([after[:, 1:], jnp.full_like(after[:, :1], t)], 1) - 1  # the chain from i ends here
    if scheme == "IOB2":
        start = pre == 1
    else:
        last_pre = jnp.take_along_axis(pre, jnp.clip(last, 0, t - 1), axis=1)
        start = (pre == 4) | ((pre == 1) & (last_pre == 3) & (last > jnp.arange(t)[None, :]))
        last = jnp.where(pre == 4, jnp.arange(t)[None, :], last)
    return start, kind, last


def entity_sums(true_bt, pred_bt, where_bt, prefix_c, kind_c, scheme: str) -> jax.Array:
    """(3,) float32 [exact matches, predicted entities, true entities] of the labelled positions (`where_bt`,
    e.g. each word's first sub-token) read in order as one tag sequence per row: `entities` on device."""
    order = jnp.argsort(~where_bt, axis=1, stable=True)  # the labelled positions first, in order
    keep = jnp.take_along_axis(where_bt, order, 1)
    gold = jnp.where(keep, jnp.take_along_axis(true_bt, order, 1), -1)
    pred = jnp.where(keep, jnp.take_along_axis(pred_bt, order, 1), -1)
    gs, gk, gl = _spans(gold, prefix_c, kind_c, scheme)
    ps, pk, pl = _spans(pred, prefix_c, kind_c, scheme)
    tp = jnp.sum(gs & ps & (gk == pk) & (gl == pl), dtype=jnp.float32)
    return jnp.stack([tp, jnp.sum(ps, dtype=jnp.float32), jnp.sum(gs, dtype=jnp.float32)])


# ---- extractive QA (the official SQuAD evaluation) ------------------------------------------------------

def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a / an / the removed, spaces collapsed."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 of two answers after `normalize_answer` (SQuAD v2: two empty answers score 1)."""
    from collections import Counter

    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], answers: dict[str, Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 in percent, each question's best over its gold answers (no gold answer: the empty
    answer is the gold one, as SQuAD v2's script has it); every question in `answers` counts."""
    em = f1 = 0.0
    for qid, golds in answers.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        pred = predictions.get(qid, "")
        em += max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        f1 += max(answer_f1(pred, g) for g in golds)
    n = max(len(answers), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "questions": float(len(answers))}
