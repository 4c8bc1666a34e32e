"""Training and eval data: rows from files or HF datasets -> tokenised fixed-shape arrays -> batches."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxopt_llm.config import DataConfig
from jaxopt_llm.data.batches import Batches, eval_batches, label_ids, split_off, take, tokenize
from jaxopt_llm.data.sources import DataError, LoadReport, read_rows

__all__ = ["Batches", "DataError", "Data", "LoadReport", "eval_batches", "load"]
_TEXT = "_text"


@dataclasses.dataclass
class Data:
    train: dict[str, np.ndarray]
    eval: dict[str, np.ndarray]
    label_names: tuple[str, ...] | None
    reports: list[LoadReport]
    texts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # split -> the rows' texts (object)


def _next_sentence_pairs(lines: list[str], seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """Sentence A = line i; B = line i + 1 (label 0, "is next") or a random other line (label 1), 50/50."""
    rng = np.random.default_rng([seed, 7])
    a, b, labels = [], [], []
    for i in range(len(lines) - 1):
        a.append(lines[i])
        if rng.random() < 0.5:
            b.append(lines[i + 1])
            labels.append(0)
        else:
            j = int(rng.integers(len(lines) - 1))
            b.append(lines[j + 1 if j + 1 != i + 1 else 0])
            labels.append(1)
    return a, b, np.asarray(labels, np.int32)


def per_class(arrays: dict[str, np.ndarray], k: int, seed: int) -> dict[str, np.ndarray]:
    """k rows of each label (all of a label's rows when it has fewer), drawn by (seed, label), in row order."""
    labels = arrays["labels"]
    keep = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        keep.append(np.random.default_rng([seed, int(label), 17]).permutation(rows)[:k])
    index = np.sort(np.concatenate(keep))
    return {name: v[index] for name, v in arrays.items()}


def load(cfg: DataConfig, tokenizer: Any, needs: Any, *, num_labels: int | None = None,
         names: tuple[str, ...] | None = None, seed: int = 0, encoders: tuple = ()) -> Data:
    """Read, clean, tokenise; hold out eval rows when no eval data is named.

    `needs` (a task's `DataNeeds`): whether rows carry labels, word ids (whole-word masking) and next-sentence
    pairs. `names`: label names fixed in advance (a resumed run, a trained head), so that ids mean the same
    thing as before; `num_labels`: model.num_labels (1: regression). `encoders`: more (texts, pairs,
    max_length) -> arrays functions (e.g. a prompt teacher's), their arrays added to the rows.
    """
    if needs.load is not None:
        return needs.load(cfg, tokenizer, names=names, seed=seed)
    label_column = cfg.label_column if needs.labels else None
    arrays, reports, label_names = {}, [], names
    for which in ("train", "eval"):
        rows = read_rows(cfg, which, label_column)
        if rows is None:
            continue
        texts, pairs, labels, report = rows
        reports.append(report)
        nsp_labels = None
        if needs.next_sentence:
            texts, pairs, nsp_labels = _next_sentence_pairs(texts, seed)
        limit = cfg.max_train_examples if which == "train" else cfg.max_eval_examples
        if limit is not None and len(texts) > limit:  # a fixed random subset (files are often sorted by label)
            keep = (np.sort(np.random.default_rng(1234).permutation(len(texts))[:limit]) if needs.labels
                    else np.arange(limit))
            texts = [texts[i] for i in keep]
            pairs = [pairs[i] for i in keep] if pairs is not None else None
            labels = [labels[i] for i in keep] if labels is not None else None
            nsp_labels = nsp_labels[keep] if nsp_labels is not None else None
        out = tokenize(tokenizer, texts, pairs, cfg.max_length, word_ids=needs.word_ids)
        for encode in (needs.encode, *encoders):
            if encode is not None:
                out.update(encode(texts, pairs, cfg.max_length))
        if nsp_labels is not None:
            out["next_sentence_label"] = nsp_labels
        if labels is not None:
            out["labels"], label_names = label_ids(labels, num_labels, label_names, cfg.labels_as_names)
        out[_TEXT] = np.asarray(texts, object)  # rides along through the splits, popped below
        arrays[which] = out
    if "eval" not in arrays:
        arrays["train"], arrays["eval"] = split_off(arrays["train"], cfg.eval_fraction)
        arrays["eval"] = take(arrays["eval"], cfg.max_eval_examples)
    if cfg.per_class is not None and "labels" in arrays["train"]:
        arrays["train"] = per_class(arrays["train"], cfg.per_class, seed)
    texts = {which: arrays[which].pop(_TEXT) for which in ("train", "eval")}
    return Data(arrays["train"], arrays["eval"], label_names if needs.labels else None, reports, texts)
