"""Word-tagged data for token classification: CoNLL-style files (a token and its tag per line, the tag in
the last column, a blank line between sentences, -DOCSTART- lines skipped) and JSON lines ({"tokens": [...],
"tags": [...]}), checked against a tagging scheme, and aligned to sub-tokens.

Every error names the file and line. Schemes: IOB2 (BIO), IOBES; IOB1 files (CoNLL-2003's original tags,
where I-X may open an entity) are read and converted to IOB2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxopt_llm.data.sources import DataError
from jaxopt_llm.metrics import SCHEMES, split_tag

IGNORE = -100  # a sub-token without a label of its own (and special tokens, padding)


class Sentence(NamedTuple):
    words: list[str]
    tags: list[str]
    lines: list[int]  # the line of each word (CoNLL), or the sentence's line repeated (JSON lines)


def read(path: str | Path) -> list[Sentence]:
    """The sentences of a .jsonl file or of a CoNLL-style file (any other name)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{str(path)!r} does not exist: pass a CoNLL-style file or a .jsonl file of "
                        '{"tokens": [...], "tags": [...]} lines.')
    text = path.read_text(encoding="utf-8", errors="replace")
    out = _jsonl(text, path) if path.suffix == ".jsonl" else _conll(text, path)
    if not out:
        raise DataError(f"{str(path)!r} holds no tagged sentence.")
    return out


def _conll(text: str, path: Path) -> list[Sentence]:
    out, words, tags, lines = [], [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if words:
                out.append(Sentence(words, tags, lines))
            words, tags, lines = [], [], []
            continue
        if len(columns) < 2:
            raise DataError(f"{path}:{number}: {line.strip()!r} has one column; a CoNLL line is a token and its "
                            "tag (the tag in the last column), a blank line between sentences.")
        words.append(columns[0])
        tags.append(columns[-1])
        lines.append(number)
    if words:
        out.append(Sentence(words, tags, lines))
    return out


def _jsonl(text: str, path: Path) -> list[Sentence]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("tokens"), list) or not isinstance(row.get("tags"),
                                                                                                  list):
            raise DataError(f'{path}:{number}: a line needs "tokens" and "tags", two lists.')
        words, tags = [str(w) for w in row["tokens"]], [str(t) for t in row["tags"]]
        if len(words) != len(tags):
            raise DataError(f"{path}:{number}: {len(words)} tokens but {len(tags)} tags.")
        if words:
            out.append(Sentence(words, tags, [number] * len(words)))
    return out


def check(sentences: list[Sentence], scheme: str, path: str) -> list[Sentence]:
    """Sentences whose tags follow `scheme` (IOB1 is converted to IOB2); the first bad tag is an error."""
    if scheme not in (*SCHEMES, "IOB1"):
        raise DataError(f"token-classification.scheme={scheme!r}: use IOB2 (BIO), IOBES or IOB1.")
    allowed = SCHEMES.get(scheme, ("B", "I"))
    out = []
    for s in sentences:
        tags = list(s.tags)
        for i, tag in enumerate(tags):
            prefix, kind = split_tag(tag)
            if prefix != "O" and (prefix not in allowed or not kind):
                raise DataError(f"{path}:{s.lines[i]}: tag {tag!r} is not a {scheme} tag (O, or "
                                f"{'/'.join(allowed)}-TYPE); set token-classification.scheme to the file's scheme.")
            prev_prefix, prev_kind = split_tag(tags[i - 1]) if i else ("O", "")
            continuing = prev_kind == kind and prev_prefix in ("B", "I")
            if scheme == "IOB1" and prefix == "I" and not continuing:
                tags[i] = f"B-{kind}"  # IOB1 opens an entity with I-X; IOB2 with B-X
            elif scheme == "IOB2" and prefix == "I" and not continuing:
                raise DataError(f"{path}:{s.lines[i]}: {tag} follows {tags[i - 1] if i else 'the sentence start'}: "
                                f"in IOB2 an entity opens with B-{kind}. If the file is IOB1 (as CoNLL-2003's "
                                "original), set token-classification.scheme=IOB1 to convert it.")
            elif scheme == "IOBES" and prefix in ("I", "E") and not continuing:
                raise DataError(f"{path}:{s.lines[i]}: {tag} follows {tags[i - 1] if i else 'the sentence start'}: "
                                f"in IOBES an entity opens with B-{kind} or is S-{kind}.")
        out.append(Sentence(s.words, tags, s.lines))
    return out


def label_names(sentences: Sequence[Sentence]) -> tuple[str, ...]:
    """"O" first, then the tags sorted by type and prefix."""
    tags = {t for s in sentences for t in s.tags} - {"O"}
    return ("O", *sorted(tags, key=lambda t: (split_tag(t)[1], "BIES".find(split_tag(t)[0]))))


def align(tokenizer: Any, sentences: Sequence[Sentence], names: Sequence[str], max_length: int,
          all_subtokens: bool = False) -> dict[str, np.ndarray]:
    """input_ids, attention_mask, token_type_ids, labels, word_starts (n, max_length) int32: a word's tag on
    its first sub-token and IGNORE on the rest (`all_subtokens`: on every sub-token, B-X / S-X continued as
    I-X), IGNORE on special tokens and padding; word_starts 1 at each word's first sub-token (where entities
    are read). Words cut off by `max_length` are dropped."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({t for s in sentences for t in s.tags} - set(index))
    if unknown:
        raise DataError(f"tags {unknown} are not among the run's labels {list(names)}: the eval data has tags "
                        "the training data lacks.")
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_length, padding="max_length", return_token_type_ids=True)
    labels = np.full((len(sentences), max_length), IGNORE, np.int32)
    starts = np.zeros((len(sentences), max_length), np.int32)
    for r, s in enumerate(sentences):
        previous = None
        for c, w in enumerate(enc.word_ids(r)):
            if w is None:
                continue
            tag = s.tags[w]
            if w != previous:
                labels[r, c], starts[r, c] = index[tag], 1
            elif all_subtokens:
                prefix, kind = split_tag(tag)
                labels[r, c] = index.get(f"I-{kind}", index[tag]) if prefix in ("B", "S") else index[tag]
            previous = w
    return {"input_ids": np.asarray(enc["input_ids"], np.int32),
            "attention_mask": np.asarray(enc["attention_mask"], np.int32),
            "token_type_ids": np.asarray(enc["token_type_ids"], np.int32), "labels": labels,
            "word_starts": starts}
