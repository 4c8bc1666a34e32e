"""Extractive-QA data in SQuAD's JSON format ({"data": [{"paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}, v1.1 and v2.0), checked (every
answer must be its context's text at its answer_start), and the answer's token span in each window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from jaxopt_llm.data.sources import DataError


class Question(NamedTuple):
    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character start); empty: no answer in the context


def read(path: str | Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist: pass a SQuAD-format JSON file.")
    try:
        root = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise DataError(f"{path}: not JSON ({err}).") from None
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DataError(f'{path}: a SQuAD file is an object with "data": [{{"paragraphs": [...]}}, ...].')
    out = []
    for article in root["data"]:
        for paragraph in article.get("paragraphs", []):
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{path}: a paragraph of {article.get('title', 'an article')!r} has no context.")
            for qa in paragraph.get("qas", []):
                qid = str(qa.get("id"))
                if not str(qa.get("question", "")).strip():
                    raise DataError(f"{path}: question id {qid} is empty.")
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                spans = []
                for a in answers:
                    text, start = a.get("text"), a.get("answer_start")
                    well_typed = isinstance(text, str) and isinstance(start, int)
                    found = context[start:start + len(text)] if well_typed else None
                    if found is None or found != text:
                        raise DataError(f"{path}: question id {qid}: answer {text!r} is not the context's text at "
                                        f"answer_start={start} ({context[start:start + len(text or '')]!r} is).")
                    spans.append((text, start))
                out.append(Question(qid, qa["question"], context, spans))
    if not out:
        raise DataError(f"{path} holds no question.")
    return out


def positions(questions: Sequence[Question], example_of: np.ndarray, offsets: Sequence) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """(start, end) token positions of each window's answer (the first gold answer), (0, 0) -- [CLS] -- where
    the window does not hold it whole or the question has no answer."""
    starts, ends = np.zeros(len(offsets), np.int32), np.zeros(len(offsets), np.int32)
    for w, window in enumerate(offsets):
        q = questions[int(example_of[w])]
        inside = [i for i, o in enumerate(window) if o is not None]
        if not q.answers or not inside:
            continue
        text, a = q.answers[0]
        b = a + len(text)
        if a < window[inside[0]][0] or b > window[inside[-1]][1]:
            continue
        starts[w] = max(i for i in inside if window[i][0] <= a)
        ends[w] = min(i for i in inside if window[i][1] >= b)
    return starts, ends
