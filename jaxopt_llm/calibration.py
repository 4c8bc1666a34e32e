"""Calibration: how far predicted confidence is from accuracy, and temperature scaling (Guo et al. 2017).

For probabilities p (n, c) and labels y (n,):
    NLL   = -mean log p[y]
    Brier = mean sum_c (p_c - 1[c = y])^2            (multi-class Brier score, 0 .. 2)
    ECE   = sum_b (n_b / n) |accuracy_b - confidence_b| over 15 equal-width bins of max_c p_c
Temperature scaling divides the logits by one T > 0, fitted on held-out logits by minimising NLL; it
changes confidence, never the predicted class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BINS = 15


def bin_sums(probs_bc: jax.Array, labels_b: jax.Array, weight_b: jax.Array, bins: int = BINS) -> jax.Array:
    """(3, bins) float32: per confidence bin, [weighted count, sum of confidence, sum of correct]. Sums add
    over batches and devices; `ece` turns them into the ECE."""
    confidence = jnp.max(probs_bc, -1)
    correct = (jnp.argmax(probs_bc, -1) == labels_b).astype(jnp.float32)
    index = jnp.clip(jnp.ceil(confidence * bins).astype(jnp.int32) - 1, 0, bins - 1)  # bin (k-1)/B < conf <= k/B
    rows = jnp.stack([jnp.ones_like(confidence), confidence, correct]) * weight_b
    return jnp.zeros((3, bins), jnp.float32).at[:, index].add(rows)


def ece_from_bins(sums: np.ndarray) -> float:
    count, confidence, correct = np.asarray(sums, np.float64)
    total = count.sum()
    if total == 0:
        return float("nan")
    used = count > 0
    return float(np.sum(np.abs(correct[used] - confidence[used])) / total)


def brier(probs_bc: jax.Array, labels_b: jax.Array) -> jax.Array:
    """Per example sum_c (p_c - onehot_c)^2 (b,)."""
    onehot = jax.nn.one_hot(labels_b, probs_bc.shape[-1], dtype=jnp.float32)
    return jnp.sum(jnp.square(probs_bc.astype(jnp.float32) - onehot), -1)


def metrics(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, float]:
    """accuracy, NLL, ECE and Brier of probabilities (n, c) on the host (the same formulas as evaluation)."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
    n = len(labels)
    weight = np.ones(n, np.float32)
    sums = np.asarray(bin_sums(jnp.asarray(probs, jnp.float32), jnp.asarray(labels), jnp.asarray(weight), bins))
    return {"accuracy": float(np.mean(probs.argmax(-1) == labels)),
            "nll": float(-np.mean(np.log(np.clip(probs[np.arange(n), labels], 1e-30, None)))),
            "ece": ece_from_bins(sums),
            "brier": float(np.mean(np.sum((probs - np.eye(probs.shape[-1])[labels]) ** 2, -1)))}


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


def reliability_diagram(curves: dict[str, tuple[np.ndarray, np.ndarray]], out: str, bins: int = BINS) -> None:
    """Accuracy against confidence per bin, one panel per named (probs, labels), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.4), dpi=120, squeeze=False)
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items()):
        sums = np.asarray(bin_sums(jnp.asarray(probs, jnp.float32), jnp.asarray(labels),
                                   jnp.ones(len(labels), jnp.float32), bins), np.float64)
        count, confidence, correct = sums
        centers = (np.arange(bins) + 0.5) / bins
        accuracy = np.where(count > 0, correct / np.maximum(count, 1), 0.0)
        ax.bar(centers, accuracy, width=1.0 / bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{name}: ECE {ece_from_bins(sums):.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def calibrate_run(reference: str, texts: list[str], labels: np.ndarray, plot: str | None = None) -> dict:
    """Fit the temperature of a run (single, prompt or ensemble) on held-out texts and labels; write
    temperature.json (and a reliability diagram before / after) into the run folder. Prediction and export
    apply it from then on: probabilities are softmax(log p / T), p the run's uncalibrated probabilities."""
    from jaxopt_llm.predict import Predictor
    from jaxopt_llm.runs import RunFolder

    run = RunFolder.of(reference)
    if run is None:
        raise ValueError(f"{reference!r} is not a run folder: calibration writes temperature.json into one.")
    predictor = Predictor.from_pretrained(reference, temperature=1.0)
    probs = np.asarray([r["scores"] for r in predictor.classify(list(texts))], np.float64)
    logits = np.log(np.clip(probs, 1e-30, None))
    t = fit_temperature(logits, labels)
    z = logits / t
    after = np.exp(z - z.max(-1, keepdims=True))
    after /= after.sum(-1, keepdims=True)
    record = {"temperature": t, "examples": int(len(labels)), "before": metrics(probs, labels),
              "after": metrics(after, labels)}
    run.write("temperature.json", record)
    if plot:
        reliability_diagram({"before": (probs, labels), f"after (T = {t:.2f})": (after, labels)}, plot)
    return record
