"""`jaxopt-llm monitor ART --log requests.jsonl`: drift of logged predictions against the artifact's
reference, window by window, as report.md + drift.png (+ summary returned as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxopt_llm.errors import UserError
from jaxopt_llm.serving.drift import DriftMonitor


def read_log(log: str, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n, labels), [CLS] (n, d)) of a `serve --log` file; a record that is not an object with
    `labels` finite probabilities and a finite [CLS] vector of one width is one error naming its line."""
    path = Path(log)
    if not path.is_file():
        raise UserError(f"--log {log!r} does not exist; serve with --log FILE to write one.")
    probs, cls = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{log}:{n}: not valid JSON ({err.msg}).") from None
        if not isinstance(row, dict) or "probabilities" not in row or "cls" not in row:
            raise UserError(f"{log}:{n}: a record must be an object with probabilities and cls (as serve --log "
                            "writes it).")
        try:
            p, c = np.asarray(row["probabilities"], np.float64), np.asarray(row["cls"], np.float64)
        except (TypeError, ValueError):
            raise UserError(f"{log}:{n}: probabilities and cls must be lists of numbers.") from None
        if p.shape != (labels,) or c.ndim != 1 or (cls and c.shape != cls[0].shape):
            raise UserError(f"{log}:{n}: {p.shape[0] if p.ndim == 1 else p.shape} probabilities and a [CLS] of "
                            f"shape {c.shape}; the artifact has {labels} labels"
                            + (f" and [CLS] width {cls[0].shape[0]}." if cls else "."))
        if not (np.isfinite(p).all() and np.isfinite(c).all()):
            raise UserError(f"{log}:{n}: probabilities or cls hold NaN or infinity.")
        probs.append(p)
        cls.append(c)
    if not probs:
        raise UserError(f"{log!r} holds no predictions; serve with --log to write one.")
    return np.stack(probs), np.stack(cls)


def monitor_report(artifact, log: str, out: str, window: int = 200) -> dict:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"--window {window}: must be a whole number of predictions, at least 1.")
    if artifact.reference is None:
        raise UserError(f"{artifact.path} has no drift reference: export it with --config or --data.")
    probs, cls = read_log(log, len(artifact.labels))
    windows = []
    for start in range(0, len(probs), window):
        monitor = DriftMonitor(artifact.reference, artifact.reference_cls, window=window)
        monitor.add(probs[start:start + window], cls[start:start + window])
        stats = monitor.report(min_window=min(30, window))
        if stats:
            windows.append({"from": start, "to": min(start + window, len(probs)), **stats})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(artifact, probs, windows, out_dir / "drift.png")
    lines = [f"# Drift report: {len(probs)} predictions of {artifact.path.name}", "",
             f"Reference: {artifact.reference['examples']} texts of the export. Windows of {window} predictions; "
             "small p-values mean the window differs from the reference.", "",
             "| predictions | KS p (confidence) | chi-squared p (classes) | MMD p ([CLS]) |", "|---|---|---|---|"]
    for w in windows:
        lines.append(f"| {w['from']}–{w['to']} | {w['ks_pvalue']:.3g} | {w['chi2_pvalue']:.3g} | "
                     f"{w.get('mmd_pvalue', float('nan')):.3g} |")
    live = np.bincount(probs.argmax(-1), minlength=len(artifact.labels)) / len(probs)
    lines += ["", "| class | reference share | live share |", "|---|---|---|"]
    lines += [f"| {name} | {r:.3f} | {s:.3f} |" for name, r, s in
              zip(artifact.labels, artifact.reference["class_distribution"], live)]
    lines += ["", "![drift](drift.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    return {"predictions": len(probs), "windows": windows, "report": str(out_dir / "report.md")}


def _plot(artifact, probs: np.ndarray, windows: list[dict], file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    bins = np.linspace(0, 1, 21)
    axes[0].hist(artifact.reference["confidence"], bins=bins, alpha=0.6, density=True, label="reference")
    axes[0].hist(probs.max(-1), bins=bins, alpha=0.6, density=True, label="live")
    axes[0].set_xlabel("confidence")
    axes[0].legend()
    for key, name in (("ks_pvalue", "KS"), ("chi2_pvalue", "chi-squared"), ("mmd_pvalue", "MMD")):
        axes[1].plot([w["to"] for w in windows], [w.get(key, np.nan) for w in windows], marker="o", label=name)
    axes[1].axhline(0.01, color="k", lw=0.8, ls="--")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("predictions")
    axes[1].set_ylabel("p-value")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)
