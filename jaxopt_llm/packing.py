"""Texts into fixed-shape rows for inference: the one truncation rule, length buckets, and cloze prompts.
numpy and a `tokenizers.Tokenizer` only: an exported artifact encodes with it too, so every path that
predicts cuts the same text to the same tokens.

Truncation: a model's texts are cut to its `max_length` tokens, special tokens included, by the tokenizer's
own truncation (what `tokenizer(texts, truncation=True, max_length=...)` does in training). Rows are padded
to the smallest length bucket that holds the longest text of their batch.

A prompt's pieces are token-id tuples (literal text), "text", "text_pair" or "mask". For every word length
k in `lengths` the text is laid out once with k [MASK] tokens at the slot; the variants sit side by side in
one row of L * t tokens (block l at [l * t, (l + 1) * t)). The text (and pair, longest first) is cut to
fit; the pattern never is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Padded lengths: steps of 8 tokens up to 64, then 16, 32, 64: a text gains at most 7 pad tokens up to 64
# tokens, at most 25 % beyond that.
LENGTH_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def buckets_for(max_length: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> tuple[int, ...]:
    """The buckets below `max_length`, then `max_length` itself: every text fits the last one."""
    return tuple(b for b in sorted(set(buckets)) if b < max_length) + (max_length,)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n tokens (the largest when none does)."""
    return next((b for b in buckets if b >= n), buckets[-1])


def truncating(backend, max_length: int | None):
    """A copy of a `tokenizers.Tokenizer` that cuts texts to `max_length` tokens (None: never) and never pads."""
    copy = backend.__class__.from_str(backend.to_str())
    copy.no_padding()
    if max_length is None:
        copy.no_truncation()
    else:
        copy.enable_truncation(int(max_length))
    return copy


def check_texts(texts: Sequence[str]) -> list[str]:
    """`texts` as a list; one string or a non-string item is a TypeError naming it."""
    if isinstance(texts, str):
        raise TypeError("pass a list of texts, not one string.")
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"text {bad} is a {type(texts[bad]).__name__}, not a string.")
    return texts


def encode(backend, texts: Sequence[str], special_tokens: bool = True) -> list:
    """`tokenizers` encodings of texts (ids, type_ids), cut by the backend's truncation."""
    return backend.encode_batch(check_texts(texts), add_special_tokens=special_tokens)


def rows(encodings: Sequence, length: int, pad: int, batch: int | None = None) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids (batch, length) int32 of encodings no longer than `length`;
    rows past the encodings (up to `batch`) repeat the first, so a batch keeps a fixed shape."""
    n = len(encodings)
    out = {"input_ids": np.full((n, length), pad, np.int32), "attention_mask": np.zeros((n, length), np.int32),
           "token_type_ids": np.zeros((n, length), np.int32)}
    for r, e in enumerate(encodings):
        ids = e.ids
        if len(ids) > length:
            raise ValueError(f"an encoding of {len(ids)} tokens does not fit rows of {length}.")
        out["input_ids"][r, :len(ids)] = ids
        out["attention_mask"][r, :len(ids)] = 1
        out["token_type_ids"][r, :len(ids)] = e.type_ids
    return pad_rows(out, batch) if batch else out


def pad_rows(arrays: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """Rows padded (with copies of the first row) to the batch size b: fixed shapes, no recompiles."""
    n = len(next(iter(arrays.values())))
    return {k: np.concatenate([v, np.repeat(v[:1], b - n, 0)]) if b > n else v for k, v in arrays.items()}


def power_of_two(n: int, cap: int | None = None) -> int:
    """The batch size n texts are padded to: the next power of two (at most `cap`)."""
    b = 1 << (max(n, 1) - 1).bit_length()
    return min(b, cap) if cap else b


def truncate(text: list[int], pair: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Shorten the text (and pair, longest first) to `budget` tokens together."""
    if pair is None:
        return list(text)[:budget], None
    text, pair = list(text), list(pair)
    while len(text) + len(pair) > budget:
        (text if len(text) >= len(pair) else pair).pop()
    return text, pair


def pack(pieces: Sequence, lengths: Sequence[int], special: dict[str, int], max_length: int,
         text_ids: Sequence[Sequence[int]], pair_ids: Sequence[Sequence[int]] | None = None,
         prefix: str = "prompt") -> dict[str, np.ndarray]:
    """{prefix}_ids, _mask, _types (n, L * t) and _slots (n, L, K) int32 for token ids without specials.
    special: {"cls", "sep", "pad", "mask"} ids."""
    t, n, L, K = max_length, len(text_ids), len(lengths), max(lengths)
    pair_ids = pair_ids if pair_ids is not None else [None] * n
    budget = t - 2 - K - sum(len(p) for p in pieces if not isinstance(p, str))
    out = {"ids": np.full((n, L * t), special["pad"], np.int32), "mask": np.zeros((n, L * t), np.int32),
           "types": np.zeros((n, L * t), np.int32), "slots": np.zeros((n, L, K), np.int32)}
    for r in range(n):
        text, pair = truncate(text_ids[r], pair_ids[r], budget)
        for l, k in enumerate(lengths):
            row, slots = [special["cls"]], []
            for piece in pieces:
                if piece == "mask":
                    slots = list(range(len(row), len(row) + k))
                    row += [special["mask"]] * k
                elif piece == "text":
                    row += text
                elif piece == "text_pair":
                    row += pair or []
                else:
                    row += list(piece)
            row.append(special["sep"])
            out["ids"][r, l * t:l * t + len(row)] = row
            out["mask"][r, l * t:l * t + len(row)] = 1
            out["slots"][r, l, :k] = [l * t + s for s in slots]
    return {f"{prefix}_{k}": v for k, v in out.items()}


def qa_windows(tokenizer: Any, questions: Sequence[str], contexts: Sequence[str], max_length: int,
               stride: int) -> tuple[dict[str, np.ndarray], np.ndarray, list[list]]:
    """Question + context rows for extractive QA: each context cut into windows of `max_length` tokens
    (question included) that overlap by `stride` tokens, so an answer near a cut is whole in some window.

    Returns (input_ids, attention_mask, token_type_ids (n_windows, max_length) int32; the example of each
    window (n_windows,); per window, each token's character span in its context, or None outside it)."""
    if stride < 0 or stride >= max_length // 2:  # callers check it for people (answers.check_stride)
        raise ValueError(f"stride={stride} must be in [0, max_length // 2).")
    pad_right = getattr(tokenizer, "padding_side", "right") == "right"
    enc = tokenizer([q.lstrip() for q in questions] if pad_right else list(questions), list(contexts),
                    truncation="only_second", max_length=max_length, stride=stride, padding="max_length",
                    return_overflowing_tokens=True, return_offsets_mapping=True, return_token_type_ids=True)
    offsets = []
    for w in range(len(enc["input_ids"])):
        sequence = enc.sequence_ids(w)
        offsets.append([tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][w], sequence)])
    arrays = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    return arrays, np.asarray(enc["overflow_to_sample_mapping"], np.int32), offsets
