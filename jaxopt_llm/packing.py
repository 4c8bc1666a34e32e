"""Packing cloze prompts into fixed-shape rows (numpy only: an exported artifact packs with it too).

A prompt's pieces are token-id tuples (literal text), "text", "text_pair" or "mask". For every word length
k in `lengths` the text is laid out once with k [MASK] tokens at the slot; the variants sit side by side in
one row of L * t tokens (block l at [l * t, (l + 1) * t)). The text (and pair, longest first) is cut to
fit; the pattern never is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
