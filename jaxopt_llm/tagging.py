"""Token-classification outputs as entities with character offsets, in the shapes of Hugging Face's
token-classification pipeline:

- aggregation "none": every sub-token whose tag is not O, {entity, score, index, word, start, end};
- "simple": adjacent sub-tokens joined into entities (B- or S- opens one, I- and E- of the same type continue
  it, E- and S- close it), {entity_group, score (the mean), word, start, end};
- "first" (the default, as training labels each word's first sub-token): each word takes its first
  sub-token's tag and score, then words are joined as in "simple".

`word` is the text between the offsets, so it is the input's own spelling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxopt_llm.errors import UserError

AGGREGATIONS = ("first", "simple", "none")


def decode(text: str, encoding, probs_tc: np.ndarray, labels: Sequence[str], aggregation: str = "first"
           ) -> list[dict]:
    """The entities of one text from its `tokenizers` encoding and its tag probabilities (t, c)."""
    if aggregation not in AGGREGATIONS:
        raise UserError(f"aggregation={aggregation!r}: use one of {', '.join(AGGREGATIONS)}.")
    units = []  # (tag, score, start, end, index, word id) of each real sub-token
    for i, (special, (start, end)) in enumerate(zip(encoding.special_tokens_mask, encoding.offsets)):
        if special or i >= len(probs_tc) or end <= start:
            continue
        best = int(np.argmax(probs_tc[i]))
        units.append((labels[best], float(probs_tc[i][best]), start, end, i, encoding.word_ids[i]))
    if aggregation == "none":
        return [{"entity": tag, "score": score, "index": i, "word": text[s:e], "start": s, "end": e}
                for tag, score, s, e, i, _ in units if tag != "O"]
    if aggregation == "first":
        words: list = []
        for unit in units:
            if words and unit[5] is not None and unit[5] == words[-1][5]:
                words[-1] = (*words[-1][:3], unit[3], *words[-1][4:])  # the word ends where its last piece does
            else:
                words.append(unit)
        units = words
    return _groups(text, units)


def _groups(text: str, units: list) -> list[dict]:
    out, current = [], None

    def close():
        nonlocal current
        if current is not None:
            kind, scores, start, end = current
            out.append({"entity_group": kind, "score": float(np.mean(scores)), "word": text[start:end],
                        "start": start, "end": end})
        current = None

    from jaxopt_llm.metrics import split_tag  # here: the metrics module imports jax, a server need not

    for tag, score, start, end, _, _ in units:
        prefix, kind = split_tag(tag)
        if prefix == "O":
            close()
            continue
        if current is not None and prefix in ("I", "E") and kind == current[0]:
            current = (kind, current[1] + [score], current[2], end)
        else:
            close()
            current = (kind, [score], start, end)
        if prefix in ("E", "S"):
            close()
    close()
    return out


def scheme_of(labels: Sequence[str]) -> str:
    """The tagging scheme of a tagger's tags: IOBES where it has E- or S- tags, else IOB2 (IOB1 files are read
    as IOB2)."""
    return "IOBES" if any(t[:2] in ("E-", "S-") for t in labels) else "IOB2"


def word_tags(words: Sequence[str], tokens: Sequence[dict]) -> list[str]:
    """The tag of each word of `" ".join(words)` from its sub-tokens' tags (aggregation "none"): the tag of
    the sub-token that starts where the word does (its first), O where that one is O or was cut off."""
    first, at = {}, 0
    for w in words:
        first[at] = len(first)
        at += len(w) + 1
    tags = ["O"] * len(words)
    for token in tokens:
        if token["start"] in first:
            tags[first[token["start"]]] = token["entity"]
    return tags


def score(model, sentences: Sequence, scheme: str = "IOB2") -> tuple[dict, list[list[str]]]:
    """Entity precision / recall / F1 (strict, seqeval's) and word accuracy of a tagger (`inference.load`: run,
    ensemble or artifact) on word-tagged `sentences` (`data.tagged`), through its `tag` on the words joined by
    spaces, as every prediction path tags; and the predicted tags per sentence."""
    from jaxopt_llm.metrics import entity_scores

    found = model.tag([" ".join(s.words) for s in sentences], "none")
    predicted = [word_tags(s.words, tokens) for s, tokens in zip(sentences, found)]
    scores = entity_scores([s.tags for s in sentences], predicted, scheme)
    pairs = [(t, p) for s, row in zip(sentences, predicted) for t, p in zip(s.tags, row)]
    return {"entity_precision": scores["precision"], "entity_recall": scores["recall"], "entity_f1": scores["f1"],
            "word_accuracy": float(np.mean([t == p for t, p in pairs])) if pairs else 0.0}, predicted
