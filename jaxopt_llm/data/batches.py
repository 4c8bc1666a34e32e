"""Tokenised fixed-shape arrays, label maps, and resumable deterministic batches.

Every array has a leading example axis. Training batch number `position` is a pure function of
(seed, position): epoch = position // batches_per_epoch is shuffled by a permutation drawn from
(seed, epoch), so resuming at a stored position gives the same batches as never stopping.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxopt_llm.data.sources import DataError


def tokenize(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int, *,
             word_ids: bool = False) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids, special_tokens_mask (n, max_length) int32 (+ word_ids)."""
    arrays: dict[str, list] = {}
    for start in range(0, len(texts), 4096):
        chunk = list(texts[start:start + 4096])
        enc = tokenizer(chunk, list(pairs[start:start + 4096]) if pairs is not None else None, truncation=True,
                        max_length=max_length, padding="max_length", return_special_tokens_mask=True,
                        return_token_type_ids=True)
        for key in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"):
            arrays.setdefault(key, []).append(np.asarray(enc[key], np.int32))
        if word_ids:
            rows = []
            for i in range(len(chunk)):
                words, seqs = enc.word_ids(i), enc.sequence_ids(i)
                rows.append([-1 if w is None else w + (100_000 if s == 1 else 0) for w, s in zip(words, seqs)])
            arrays.setdefault("word_ids", []).append(_dense_word_ids(np.asarray(rows, np.int64)))
    out = {k: np.concatenate(v) for k, v in arrays.items()}
    out["special_tokens_mask"] |= out["attention_mask"] == 0  # padding is never masked
    return out


def _dense_word_ids(raw: np.ndarray) -> np.ndarray:
    """Word ids renumbered 0.. per row in order of appearance (< max_length), -1 kept."""
    out = np.full(raw.shape, -1, np.int32)
    for r, row in enumerate(raw):
        seen: dict[int, int] = {}
        for c, w in enumerate(row):
            if w >= 0:
                out[r, c] = seen.setdefault(int(w), len(seen))
    return out


def label_ids(labels: Sequence, num_labels: int | None, names: Sequence[str] | None = None,
              as_names: bool = False) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels -> (ids, names). Strings map to sorted names (or the given `names`); ints are ids, checked
    against `num_labels` (or, with `as_names`, names sorted by value); with num_labels == 1 labels are float
    regression targets."""
    if num_labels == 1:
        try:
            return np.asarray([float(x) for x in labels], np.float32), ("score",)
        except ValueError as err:
            raise DataError(f"model.num_labels=1 means regression, but a label is not a number ({err}).") from None
    values = list(labels)
    if all(isinstance(x, str) for x in values) and all(x.lstrip("-").isdigit() for x in values):
        values = [int(x) for x in values]
    integers = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in values)
    if integers and not as_names:
        ids = np.asarray(values, np.int32)
        n = num_labels or int(ids.max()) + 1
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size or (num_labels is None and ids.min() > 0):
            found = sorted(set(ids.tolist()))
            raise DataError(f"integer labels {found[:10]} are not ids 0..{n - 1}" + (
                f" (model.num_labels={n})" if num_labels else "") + ": set data.labels_as_names=true to use them "
                "as names (sorted by value), or model.num_labels to the number of classes if they are ids.")
        return ids, tuple(names) if names else tuple(str(i) for i in range(n))
    strings = [str(x) for x in values]
    if integers and not names:
        names = tuple(str(v) for v in sorted(set(int(x) for x in values)))
    names = tuple(names) if names else tuple(sorted(set(strings)))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(strings) - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the training labels {list(names)}.")
    if num_labels is not None and len(names) > num_labels:
        raise DataError(f"the data has {len(names)} labels {list(names)} but model.num_labels={num_labels}: "
                        f"set model.num_labels={len(names)}.")
    return np.asarray([index[s] for s in strings], np.int32), names


def split_off(arrays: dict[str, np.ndarray], fraction: float, seed: int = 1234
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(rest, held-out) with `fraction` of the rows held out, chosen by a fixed permutation."""
    n = len(next(iter(arrays.values())))
    n_eval = int(round(n * fraction))
    if not 0 < n_eval < n:
        raise DataError(f"data.eval_fraction={fraction} of {n} rows leaves no train or no eval rows.")
    perm = np.random.default_rng(seed).permutation(n)
    return ({k: v[perm[n_eval:]] for k, v in arrays.items()}, {k: v[perm[:n_eval]] for k, v in arrays.items()})


def hold_out(train: list, eval_items: list | None, fraction: float, limit: int | None) -> tuple[list, list]:
    """(train, eval) items -- sentences, questions -- before they become rows: `eval_items` when given, else
    `fraction` of `train` held out by `split_off`'s permutation, so one item's rows (a long context's windows)
    never land on both sides; eval cut to `limit`."""
    if eval_items is None:
        rest, held = split_off({"i": np.arange(len(train))}, fraction)
        train, eval_items = [train[i] for i in rest["i"]], [train[i] for i in held["i"]]
    return train, eval_items[:limit] if limit else eval_items


def take(arrays: dict[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
    return arrays if limit is None else {k: v[:limit] for k, v in arrays.items()}


class Batches:
    """Training batches by global position; each process gets its own rows of every global batch."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, *, process_index: int = 0,
                 process_count: int = 1):
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))
        if batch_size % process_count:
            raise DataError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes.")
        self.batch_size, self.seed = batch_size, seed
        self.batches_per_epoch = self.n // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.n} training examples are fewer than train.batch_size={batch_size}: lower the "
                            "batch size or add data.")
        local = batch_size // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(int(position), self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        index = self._perm[i * self.batch_size:(i + 1) * self.batch_size][self.rows]
        batch = {k: v[index] for k, v in self.arrays.items()}
        batch["index"] = index.astype(np.int32)
        batch["weight"] = np.ones(len(index), np.float32)
        return batch


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """All rows in order, the last batch padded with weight-0 rows so that every batch has one shape."""
    n = len(next(iter(arrays.values())))
    local = batch_size // process_count
    count = -(-n // batch_size)
    for b in range(count if limit is None else min(count, limit)):
        index = np.arange(b * batch_size, (b + 1) * batch_size)[process_index * local:(process_index + 1) * local]
        weight = (index < n).astype(np.float32)
        index = np.where(index < n, index, 0)
        batch = {k: v[index] for k, v in arrays.items()}
        batch["index"] = index.astype(np.int32)
        batch["weight"] = weight
        yield batch
