"""Measuring a stage's model: every stage on the same test texts, loaded through `inference.load`, with the
latency and the device it was measured on written into the stage's metrics.json at measure time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from jaxopt_llm import paths
from jaxopt_llm.paths import write_text
from jaxopt_llm.pipeline import split as split_lib
from jaxopt_llm.pipeline.spec import Pipeline
from jaxopt_llm.runs import write_json

TIMED_BATCHES = 4  # latency: the mean per text over this many batches of the test split, after compilation


def _mask_longest_word(text: str, mask: str) -> str:
    words = text.split()
    longest = max(range(len(words)), key=lambda i: len(words[i])) if words else 0
    return " ".join(mask if i == longest else w for i, w in enumerate(words)) or mask


def measure(pipeline: Pipeline, kind: str, model: str, data: Path, folder: Path) -> dict:
    """metrics.json and predictions.jsonl of a stage's model on the pipeline's test set and examples, with the
    latency and the device it was measured on (the report shows them as measured, not as the machine that
    writes the report)."""
    from jaxopt_llm import inference
    from jaxopt_llm import metrics as metrics_lib

    loaded = inference.load(model, batch_size=pipeline.batch_size)
    if loaded.kind == "masked-lm":
        return _measure_mlm(pipeline, loaded, folder)
    if pipeline.data.task == "token-classification":
        return _measure_tagger(pipeline, loaded, split_lib.part(data, "test", pipeline.data.task), folder)
    if pipeline.data.task == "question-answering":
        return _measure_reader(pipeline, loaded, split_lib.part(data, "test", pipeline.data.task), folder)
    names = json.loads((data / "labels.json").read_text())
    texts, labels = split_lib.texts(data / "test.csv", names)
    probs = loaded.probs(texts)  # compiles every batch shape the timed pass meets
    timed = texts[:TIMED_BATCHES * pipeline.batch_size]
    start = time.perf_counter()
    loaded.probs(timed)
    latency = (time.perf_counter() - start) / len(timed) * 1000
    to_ours = [names.index(n) for n in loaded.labels]  # the model's label order -> the pipeline's
    probs_ = np.zeros((len(texts), len(names)))
    probs_[:, to_ours] = probs
    m = metrics_lib.classification(probs_, labels)
    m.pop("confusion")
    robust, robust_n = (_robust(loaded, names, texts, labels, pipeline) if loaded.kind == "classifier"
                        and not loaded.artifact else (None, None))
    examples = loaded.probs(list(pipeline.examples)) if pipeline.examples else np.zeros((0, len(names)))
    metrics = {**m, "robust_accuracy": robust, "robust_examples": robust_n,
               "epsilon": pipeline.epsilon, "latency_ms": latency, **device(), "parameters": loaded.parameters(),
               "test_examples": len(texts), "max_length": loaded.max_length,
               "model": model, "temperature": loaded.temperature, "note": _note(loaded),
               "examples": [{"text": t, "label": loaded.labels[int(p.argmax())], "score": float(p.max())}
                            for t, p in zip(pipeline.examples, examples)]}
    write_text(folder / "predictions.jsonl", "".join(
        json.dumps({"text": t, "label": names[y], "predicted": names[int(p.argmax())],
                    "scores": [round(float(x), 6) for x in p]}) + "\n" for t, y, p in zip(texts, labels, probs_)))
    write_json(folder / "metrics.json", metrics)
    return metrics


def device() -> dict:
    """The device and host a latency was measured on."""
    import platform

    import jax

    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": f"{device.platform} ({getattr(device, 'device_kind', '')})", "cpu": cpu}


def _note(model) -> str | None:
    if model.artifact:
        return "served by the exported jax.export artifact"
    if model.kind == "ensemble":
        return f"ensemble of {model.engine.members} members; robust accuracy is measured on single models"
    if model.kind == "prompt":
        return "cloze prompt; robust accuracy is measured on classifier heads"
    return None


def _robust(model, names: list[str], texts: list[str], labels: np.ndarray, pipeline: Pipeline) -> tuple[float, int]:
    """Accuracy under the pipeline's PGD attack on its first `robust_examples` test texts (cut to the model's
    own length), and their count."""
    from jaxopt_llm import robustness
    from jaxopt_llm.data.batches import tokenize

    n = len(texts) if pipeline.robust_examples is None else min(pipeline.robust_examples, len(texts))
    texts, labels = texts[:n], labels[:n]
    arrays = tokenize(model.tokenizer, texts, None, model.max_length)
    arrays["labels"] = np.asarray([list(model.labels).index(names[y]) for y in labels], np.int32)  # the model's order
    rows = robustness.robust_accuracy(model.engine.model, arrays, [pipeline.epsilon], steps=pipeline.pgd_steps,
                                      batch_size=pipeline.batch_size)
    return float(rows[0]["accuracy"]), n


def _measure_mlm(pipeline: Pipeline, model, folder: Path) -> dict:
    """A masked-LM stage: its last eval's masked-token accuracy and fill-mask on the examples (longest word
    masked)."""
    from jaxopt_llm.train import read_metrics

    evals = [r for r in read_metrics(paths.Path(model.reference) / "metrics.jsonl") if r["split"] == "eval"]
    mask = model.tokenizer.mask_token
    masked = [_mask_longest_word(t, mask) for t in pipeline.examples]
    fills = model.fill_mask(masked, top_k=3) if masked else []
    start = time.perf_counter()
    if masked:
        model.fill_mask(masked, top_k=3)
    latency = (time.perf_counter() - start) / max(len(masked), 1) * 1000
    metrics = {"mlm_accuracy": evals[-1].get("mlm_accuracy") if evals else None,
               "mlm_loss": evals[-1].get("loss") if evals else None, "latency_ms": latency, **device(),
               "parameters": model.parameters(), "model": model.reference, "max_length": model.max_length,
               "note": "masked-LM stage: no classifier yet; examples show fill-mask of the longest word",
               "examples": [{"text": m, "label": " / ".join(c["token"] for c in fill), "score": fill[0]["score"]}
                            for m, fill in zip(masked, fills)]}
    write_text(folder / "predictions.jsonl", "".join(json.dumps({"text": m, "fill_mask": fill}) + "\n"
                                                     for m, fill in zip(masked, fills)))
    write_json(folder / "metrics.json", metrics)
    return metrics


def _common(model, latency: float, n: int) -> dict:
    return {"latency_ms": latency, **device(), "parameters": model.parameters(), "test_examples": n,
            "max_length": model.max_length, "model": model.reference, "note": _note(model)}


def _timed(fn, items: list) -> float:
    """ms per item of `fn(items)` over the first TIMED_BATCHES batches, after compilation."""
    start = time.perf_counter()
    fn(items)
    return (time.perf_counter() - start) / max(len(items), 1) * 1000


def _measure_tagger(pipeline: Pipeline, model, test: Path, folder: Path) -> dict:
    """A token classifier: entity precision / recall / F1 (strict) and word accuracy on the test sentences
    (`tagging.score`, through the model's `tag`); the examples' entities."""
    from jaxopt_llm import tagging
    from jaxopt_llm.data import tagged

    sentences = tagged.read(test)
    scores, predicted = tagging.score(model, sentences, scheme=tagging.scheme_of(model.labels))
    latency = _timed(model.tag, [" ".join(s.words) for s in sentences[:TIMED_BATCHES * pipeline.batch_size]])
    examples = model.tag(list(pipeline.examples)) if pipeline.examples else []
    metrics = {**scores, **_common(model, latency, len(sentences)),
               "examples": [{"text": t, "label": "; ".join(f"{e['entity_group']}: {e['word']}" for e in found) or "O",
                             "score": float(np.mean([e["score"] for e in found])) if found else 1.0}
                            for t, found in zip(pipeline.examples, examples)]}
    write_text(folder / "predictions.jsonl", "".join(
        json.dumps({"tokens": s.words, "tags": s.tags, "predicted": p}, ensure_ascii=False) + "\n"
        for s, p in zip(sentences, predicted)))
    write_json(folder / "metrics.json", metrics)
    return metrics


def _measure_reader(pipeline: Pipeline, model, test: Path, folder: Path) -> dict:
    """A question-answering model: exact match and F1 (the SQuAD script's) on the test questions."""
    from jaxopt_llm import answers
    from jaxopt_llm.data import squad

    questions = squad.read(test)
    scores, found = answers.score(model, questions)
    timed = questions[:TIMED_BATCHES * pipeline.batch_size]
    latency = _timed(lambda qs: model.answer([q.question for q in qs], [q.context for q in qs]), timed)
    metrics = {**scores, **_common(model, latency, len(questions)), "examples": []}
    write_text(folder / "predictions.jsonl", "".join(
        json.dumps({"id": q.id, "question": q.question, "gold": [a for a, _ in q.answers], **row},
                   ensure_ascii=False) + "\n" for q, row in zip(questions, found)))
    write_json(folder / "metrics.json", metrics)
    return metrics
