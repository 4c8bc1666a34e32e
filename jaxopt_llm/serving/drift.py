"""Drift of live predictions against the export's reference (its eval texts):

  confidence    two-sample Kolmogorov-Smirnov test on the max probability
  classes       chi-squared test of the predicted-class counts against the reference class distribution
  embeddings    maximum mean discrepancy (RBF kernel, median bandwidth) of [CLS] embeddings, with a
                permutation p-value

Small p-values say the live window differs from the reference.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np


def ks(live: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    from scipy.stats import ks_2samp

    result = ks_2samp(live, reference)
    return float(result.statistic), float(result.pvalue)


def chi2(predicted: np.ndarray, reference_distribution: np.ndarray) -> tuple[float, float]:
    """Counts of predicted classes against the expected counts (reference shares, floored so that no
    expected count is zero)."""
    from scipy.stats import chisquare

    counts = np.bincount(predicted, minlength=len(reference_distribution)).astype(float)
    expected = np.maximum(np.asarray(reference_distribution, float), 1e-3)
    expected = expected / expected.sum() * counts.sum()
    result = chisquare(counts, expected)
    return float(result.statistic), float(result.pvalue)


def mmd(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d), RBF kernel with the median pairwise distance as
    bandwidth, and the permutation p-value."""
    z = np.concatenate([x, y]).astype(np.float64)
    d2 = np.maximum(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1), 0.0)
    bandwidth = np.median(d2[np.triu_indices(len(z), 1)]) or 1.0
    k = np.exp(-d2 / bandwidth)
    n = len(x)

    def stat(index):
        a, b = index[:n], index[n:]
        kxx, kyy, kxy = k[np.ix_(a, a)], k[np.ix_(b, b)], k[np.ix_(a, b)]
        return ((kxx.sum() - np.trace(kxx)) / (len(a) * (len(a) - 1)) + (kyy.sum() - np.trace(kyy)) /
                (len(b) * (len(b) - 1)) - 2 * kxy.mean())

    observed = stat(np.arange(len(z)))
    rng = np.random.default_rng(seed)
    null = [stat(rng.permutation(len(z))) for _ in range(permutations)]
    return float(observed), float((1 + sum(v >= observed for v in null)) / (1 + permutations))


class DriftMonitor:
    """A sliding window of the last `window` predictions, compared with the reference on demand."""

    def __init__(self, reference: dict | None, reference_cls: np.ndarray | None, window: int = 500,
                 embedding_sample: int = 100):
        self.reference, self.reference_cls = reference, reference_cls
        self.confidence, self.classes = deque(maxlen=window), deque(maxlen=window)
        self.cls = deque(maxlen=embedding_sample)
        self.lock = threading.Lock()

    def add(self, probs: np.ndarray, cls: np.ndarray) -> None:
        with self.lock:
            self.confidence.extend(probs.max(-1).tolist())
            self.classes.extend(probs.argmax(-1).tolist())
            self.cls.extend(list(cls))

    def report(self, min_window: int = 30) -> dict[str, float]:
        """{statistic: value} for whatever the window and the reference allow ({} before min_window). Safe to
        call from another thread than `add`: it works on a copy of the window."""
        with self.lock:
            confidence, classes, cls = np.asarray(self.confidence), np.asarray(self.classes, int), list(self.cls)
        if self.reference is None or len(confidence) < min_window:
            return {}
        out = {}
        out["ks_statistic"], out["ks_pvalue"] = ks(confidence, np.asarray(self.reference["confidence"]))
        out["chi2_statistic"], out["chi2_pvalue"] = chi2(classes, np.asarray(self.reference["class_distribution"]))
        if self.reference_cls is not None and len(cls) >= min_window:
            out["mmd"], out["mmd_pvalue"] = mmd(np.asarray(cls), self.reference_cls[:len(cls)], permutations=100)
        return out
