"""Temperature scaling (Guo et al. 2017) and reliability diagrams.

Pure formulas; the metrics themselves are in `jaxopt_llm.metrics`. Temperature scaling divides the logits
by one T > 0, fitted on held-out logits by minimising NLL; it changes confidence, never the predicted class.
"""

from __future__ import annotations

import numpy as np

from jaxopt_llm import metrics as metrics_lib


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) (n, c) in float64: what a fitted temperature does to a run's scores."""
    z = np.asarray(logits, np.float64) / temperature
    out = np.exp(z - z.max(-1, keepdims=True))
    return out / out.sum(-1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on held-out logits (n, c)."""
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(-1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]))

    result = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded",
                             options={"xatol": 1e-6})
    return float(np.exp(result.x))


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: str,
                        bins: int = metrics_lib.BINS) -> None:
    """Accuracy against confidence per bin, one panel per named (probs, labels), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), dpi=120, squeeze=False)
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items()):
        sums = metrics_lib.calibration_bins(probs, labels, bins)
        count, confidence, correct = sums
        centers = (np.arange(bins) + 0.5) / bins
        accuracy = np.where(count > 0, correct / np.maximum(count, 1), 0.0)
        ax.bar(centers, accuracy, width=1.0 / bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{name}: ECE {metrics_lib.ece_from_bins(sums):.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
