"""Answer spans from start / end logits: the best span of each window (both ends inside the context, end not
before start, at most `max_answer_length` tokens), the best over a question's windows, and -- where questions
may have no answer -- the empty answer when the windows' null score ([CLS] start and end) beats it by more than
`null_threshold`. Spans are character offsets into the context."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxopt_llm.errors import UserError


def check_stride(stride: int, max_length: int) -> None:
    """Raise a UserError unless `stride` (the tokens two windows of a long context share) is a whole number
    from 0 to under half of `max_length`."""
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 <= stride < max_length // 2:
        raise UserError(f"stride={stride!r}: the windows' overlap must be a whole number of tokens from 0 to under "
                        f"half of max_length={max_length} (question-answering.stride / --stride).")


def best_span(start_t: np.ndarray, end_t: np.ndarray, offsets: Sequence, max_answer_length: int,
              n_best: int = 20) -> tuple[float, int, int] | None:
    """(score, start char, end char) of a window's best span, or None if no span is valid: the `n_best`
    starts and ends are taken among the context's tokens only (question, specials and padding masked first,
    as transformers' question-answering pipeline does)."""
    context = np.asarray([i < len(offsets) and offsets[i] is not None for i in range(len(start_t))])
    if not context.any():
        return None
    low = np.finfo(np.float32).min
    starts = np.argsort(-np.where(context, start_t, low))[:min(n_best, int(context.sum()))]
    ends = np.argsort(-np.where(context, end_t, low))[:min(n_best, int(context.sum()))]
    best = None
    for i in starts:
        for j in ends:
            if j < i or j - i + 1 > max_answer_length:
                continue
            score = float(start_t[i] + end_t[j])
            if best is None or score > best[0]:
                best = (score, offsets[i][0], offsets[j][1])
    return best


def answer(context: str, windows: Sequence[tuple[np.ndarray, np.ndarray, Sequence]], max_answer_length: int = 30,
           no_answer: bool = False, null_threshold: float = 0.0) -> dict:
    """{answer, score, start, end} of one question from its windows' (start logits, end logits, offsets);
    answer "" (start = end = 0) when `no_answer` allows it and the null score wins."""
    best, null = None, None
    for start_t, end_t, offsets in windows:
        span = best_span(start_t, end_t, offsets, max_answer_length)
        if span is not None and (best is None or span[0] > best[0]):
            best = span
        score = float(start_t[0] + end_t[0])
        null = score if null is None else min(null, score)
    if best is None or (no_answer and null is not None and null - best[0] > null_threshold):
        return {"answer": "", "score": null if null is not None else 0.0, "start": 0, "end": 0}
    score, a, b = best
    return {"answer": context[a:b], "score": score, "start": int(a), "end": int(b)}


def from_windows(contexts: Sequence[str], example_of: np.ndarray, logits: Sequence[np.ndarray],
                 offsets: Sequence, max_answer_length: int = 30, no_answer: bool = False) -> list[dict]:
    """`answer` of every question from all windows at once: window w belongs to question example_of[w] and
    has start / end logits logits[w] (2, t) and token spans offsets[w] (`packing.qa_windows`)."""
    windows: list[list] = [[] for _ in contexts]
    for w, e in enumerate(example_of):
        windows[int(e)].append((logits[w][0], logits[w][1], offsets[w]))
    return [answer(c, ws, max_answer_length, no_answer) for c, ws in zip(contexts, windows)]


def score(model, questions: Sequence, **options) -> tuple[dict, list[dict]]:
    """Exact match and F1 (percent, the official SQuAD script's) of a reader (`inference.load`) on `questions`
    (`data.squad`), and its answer to each."""
    from jaxopt_llm.metrics import squad_scores

    found = model.answer([q.question for q in questions], [q.context for q in questions], **options)
    scores = squad_scores({q.id: row["answer"] for q, row in zip(questions, found)},
                          {q.id: [a for a, _ in q.answers] for q in questions})
    return {"exact_match": scores["exact_match"], "qa_f1": scores["f1"]}, found
