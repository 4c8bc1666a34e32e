"""The pipeline's report.html (self-contained: inline SVG, no scripts, no network) and model_card.md."""

from __future__ import annotations

import html
import json
from pathlib import Path

from jaxopt_llm.paths import write_text
from jaxopt_llm.pipeline.measure import TIMED_BATCHES

COLUMNS = (("accuracy", "accuracy", 4), ("f1", "macro-F1", 4), ("nll", "NLL", 4), ("ece", "ECE", 4),
           ("robust_accuracy", "robust acc.", 4), ("mlm_accuracy", "MLM acc.", 4),
           ("entity_f1", "entity F1", 4), ("entity_precision", "entity P", 4), ("entity_recall", "entity R", 4),
           ("word_accuracy", "word acc.", 4), ("exact_match", "EM", 2), ("qa_f1", "QA F1", 2),
           ("latency_ms", "ms / text", 2), ("parameters", "parameters", 0), ("stage_seconds", "stage s", 0))
TASK = {"classification": ("text-classification", "Text Classification", "texts"),  # HF pipeline tag, name, unit
        "token-classification": ("token-classification", "Token Classification", "sentences"),
        "question-answering": ("question-answering", "Question Answering", "questions")}
PLOTS = (("accuracy", "Accuracy on the test set (higher is better)"),
         ("entity_f1", "Entity F1 on the test set (higher is better)"),
         ("qa_f1", "QA F1 on the test set (higher is better)"),
         ("ece", "Expected calibration error (lower is better)"),
         ("robust_accuracy", "Robust accuracy under PGD (higher is better)"),
         ("latency_ms", "Prediction latency, ms per text (lower is better)"))


def columns(stages: list[dict]) -> list[tuple[str, str, int]]:
    """The COLUMNS some stage has a value for."""
    return [c for c in COLUMNS if any(cell(r["metrics"].get(c[0]), c[2]) != "-" for r in stages)]


def cell(value, digits: int) -> str:
    """The table's text for a metric: fixed decimals, '-' where the stage has none."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return f"{value:,.0f}" if digits == 0 else f"{value:.{digits}f}"


def _bars(rows: list[dict], metric: str, title: str) -> str:
    """A horizontal bar chart of one metric per stage, as inline SVG (a <figure>)."""
    svg = bar_chart(rows, metric, title)
    return f"<figure>{svg}</figure>" if svg else ""


def bar_chart(rows: list[dict], metric: str, title: str) -> str:
    """A horizontal bar chart of one metric per stage: a standalone SVG document ('' without values)."""
    values = [(r["name"], r["metrics"].get(metric)) for r in rows]
    values = [(n, v) for n, v in values if isinstance(v, (int, float))]
    if not values:
        return ""
    top = max(v for _, v in values) or 1.0
    height, width, left = 22 * len(values) + 30, 560, 130
    bars = []
    for i, (name, value) in enumerate(values):
        y = 24 + 22 * i
        w = (width - left - 70) * value / top
        bars.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(name)}</text>'
                    f'<rect x="{left}" y="{y}" width="{w:.1f}" height="16" fill="#3b6ea8"></rect>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 13}">{value:.4g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}" font-family="sans-serif" font-size="12">'
            f'<rect width="100%" height="100%" fill="white"></rect>'
            f'<text x="0" y="14" font-weight="bold">{html.escape(title)}</text>{"".join(bars)}</svg>')


def write(pipeline, workdir: Path, rows: list[dict]) -> Path:
    stages = [r for r in rows if r["name"] != "data"]
    data = next(r for r in rows if r["name"] == "data")["metrics"]
    unit = TASK[pipeline.data.task][2]
    shown = columns(stages)
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in shown)
    body = []
    for r in stages:
        m = r["metrics"]
        cells = "".join(f'<td data-metric="{k}">{cell(m.get(k), d)}</td>' for k, _, d in shown)
        body.append(f'<tr data-stage="{html.escape(r["name"])}"><th>{html.escape(r["name"])}</th>'
                    f'<td>{html.escape(r["kind"])}</td>{cells}</tr>')
    examples = []
    for i, text in enumerate(pipeline.examples):
        cells = []
        for r in stages:
            ex = (r["metrics"].get("examples") or [])
            ex = ex[i] if i < len(ex) else None
            cells.append("<td>-</td>" if ex is None else
                         f"<td>{html.escape(str(ex['label']))} <small>({ex['score']:.2f})</small></td>")
        examples.append(f"<tr><th>{html.escape(text)}</th>{''.join(cells)}</tr>")
    notes = "".join(f"<li><b>{html.escape(r['name'])}</b>: {html.escape(r['metrics']['note'])}</li>"
                    for r in stages if r["metrics"].get("note"))
    plots = "".join(_bars(stages, k, t) for k, t in PLOTS)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(pipeline.name)}: pipeline report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}tbody th,td:nth-child(2){{text-align:left}}
figure{{display:inline-block;margin:0 1em 1em 0}}</style></head>
<body><h1>{html.escape(pipeline.name)}</h1>
<p>{_measured(pipeline, data)}
latency is the mean per {unit[:-1]} over the first {TIMED_BATCHES * pipeline.batch_size} test {unit} in batches of
{pipeline.batch_size}, after compilation, on the device each stage was measured on:
{html.escape(_devices(stages))}.</p>
<table id="stages"><thead><tr><th>stage</th><th>kind</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
<ul>{notes}</ul>
{plots}
<h2>Example texts across stages</h2>
<table id="examples"><thead><tr><th>text</th>{''.join(f'<th>{html.escape(r["name"])}</th>' for r in stages)}</tr></thead>
<tbody>{''.join(examples)}</tbody></table>
<p>Stage folders: {', '.join(html.escape(r['folder'].name) for r in rows)}.</p>
</body></html>
"""
    # everything is rendered before the first file is written: a failure leaves the last report as it was
    files = {"report.html": page, "model_card.md": model_card(pipeline, stages, data)}
    for metric, title in PLOTS:  # the same charts as files, for READMEs and slides
        svg = bar_chart(stages, metric, title)
        if svg:
            files[f"plots/{metric}.svg"] = svg
    for name, text in files.items():
        write_text(workdir / name, text)
    return workdir / "report.html"


def _measured(pipeline, data: dict) -> str:
    """What the stages are measured on, and how, for the split's task."""
    where = f"Every stage is measured on the same {data['test_examples']} held-out test"
    source = html.escape(data["source"])
    if pipeline.data.task == "token-classification":
        return (f"{where} sentences of {source} (all-O word accuracy: {data['all_o_word_accuracy']:.4f}); entity "
                "precision, recall and F1 count exact (type, span) matches over words, as seqeval's strict mode does;")
    if pipeline.data.task == "question-answering":
        return (f"{where} questions of {source} (no-answer share: {data['no_answer_share']:.4f}); exact match and "
                "F1 in percent, as the official SQuAD script computes them;")
    return (f"{where} texts of {source} (majority class: {data['majority_class_accuracy']:.4f}); robust accuracy "
            f"is accuracy under an L-inf PGD attack of {pipeline.pgd_steps} steps on the word embeddings at "
            f"&epsilon; = {pipeline.epsilon:g}{_robust_on(pipeline, data)};")


def _robust_on(pipeline, data: dict | None = None) -> str:
    if pipeline.robust_examples is None:
        return ""
    of = f" of the {data['test_examples']}" if data else ""
    return f", on the first {pipeline.robust_examples}{of} test texts"


def _devices(stages: list[dict]) -> str:
    """Where the stages' latencies were measured, as their metrics.json recorded it at measure time."""
    seen: dict[str, list[str]] = {}
    for r in stages:
        m = r["metrics"]
        where = ", ".join(str(m[k]) for k in ("device", "cpu") if m.get(k)) or "not recorded"
        seen.setdefault(where, []).append(r["name"])
    if len(seen) == 1:
        return next(iter(seen))
    return "; ".join(f"{where} ({', '.join(names)})" for where, names in seen.items())


def model_card(pipeline, stages: list[dict], data: dict) -> str:
    """A Hugging Face model card: model-index metadata for the last classifying stage, the per-stage table."""
    tag, task_name, unit = TASK[pipeline.data.task]
    metrics = {"classification": [("accuracy", "Accuracy", "accuracy", None), ("f1", "Macro F1", "f1", "macro")],
               "token-classification": [("f1", "Entity F1", "entity_f1", None),
                                        ("precision", "Entity precision", "entity_precision", None),
                                        ("recall", "Entity recall", "entity_recall", None)],
               "question-answering": [("exact_match", "Exact match", "exact_match", None),
                                      ("f1", "F1", "qa_f1", None)]}[pipeline.data.task]
    final = [r for r in stages if isinstance(r["metrics"].get(metrics[0][2]), float)]
    final = final[-1] if final else stages[-1]
    m = final["metrics"]
    metrics = [(kind, name, m.get(key), average) for kind, name, key, average in metrics]
    lines = ["---", "language: en", "license: apache-2.0", "library_name: jaxopt_llm",
             f"pipeline_tag: {tag}", f"tags: [jax, flax, bert, {tag}]", "model-index:",
             f"- name: {pipeline.name}-{final['name']}", "  results:", "  - task:",
             f"      type: {tag}", f"      name: {task_name}", "    dataset:",
             f"      name: {json.dumps(Path(data['source']).name)}", "      type: csv", "      split: test",
             "    metrics:"]
    for kind, name, value, average in metrics:
        if isinstance(value, float):
            lines += [f"    - type: {kind}", f"      value: {value:.4f}", f"      name: {name}"]
            if average:
                lines += ["      args:", f"        average: {average}"]
    baseline = {"classification": ("majority class", "majority_class_accuracy"),
                "token-classification": ("all-O word accuracy", "all_o_word_accuracy"),
                "question-answering": ("no-answer share", "no_answer_share")}[pipeline.data.task]
    shown = columns(stages)
    labels = f"Labels: {', '.join(data['labels'])}. " if data["labels"] else ""
    lines += ["---", "", f"# {pipeline.name}: {final['name']}", "",
              f"Built by `jaxopt-llm pipeline run` in {len(stages)} stages; the model is `{m.get('model')}`. "
              f"{labels}Test set: {data['test_examples']} {unit} held out of "
              f"`{data['source']}` ({baseline[0]} {data[baseline[1]]:.4f}).", "",
              "| stage | kind | " + " | ".join(label for _, label, _ in shown) + " |",
              "|---|---|" + "---:|" * len(shown)]
    for r in stages:
        lines.append(f"| {r['name']} | {r['kind']} | "
                     + " | ".join(cell(r["metrics"].get(k), d) for k, _, d in shown) + " |")
    robust = (f"Robust accuracy: L-inf PGD on word embeddings, epsilon {pipeline.epsilon:g}, {pipeline.pgd_steps} "
              f"steps{_robust_on(pipeline)}. " if pipeline.data.task == "classification" else "")
    lines += ["", f"{robust}Latency measured on {_devices(stages)}.", ""]
    return "\n".join(lines)
