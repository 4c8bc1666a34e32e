"""Extractive QA: EM / F1 against the official SQuAD v1.1 script's functions (reproduced below as the
reference) on hand-made and random answers; windows over long contexts with answers in later windows; spans
from logits against an exhaustive search; training from the command line, and `predict qa` against answers
computed from transformers' BertForQuestionAnswering on the tokenizer's own windows."""

import json
import re
import string
from collections import Counter

import numpy as np
import pytest
import torch
import transformers
from conftest import overrides

from jaxopt_llm import answers, cli, metrics, packing
from jaxopt_llm.data import DataError, squad


# ---- the official SQuAD v1.1 evaluation (evaluate-v1.1.py), as the reference ---------------------------
def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def ref_f1_score(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_exact_match_score(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def ref_evaluate(predictions, answers_by_id):
    f1 = exact_match = 0
    for qid, golds in answers_by_id.items():
        exact_match += max(ref_exact_match_score(predictions[qid], g) for g in golds)
        f1 += max(ref_f1_score(predictions[qid], g) for g in golds)
    return {"exact_match": 100.0 * exact_match / len(answers_by_id), "f1": 100.0 * f1 / len(answers_by_id)}


def test_squad_scores_equal_the_official_script():
    hand = {"1": ("The Eiffel Tower", ["Eiffel Tower"]),  # article and case: EM 1
            "2": ("in Paris, France", ["Paris"]),  # F1 2 * (1/3 * 1) / (1/3 + 1) = 0.5
            "3": ("1889", ["1887", "in 1889"]),  # the best gold "in 1889": EM 0, F1 2 * (1 * 1/2) / (1 + 1/2) = 2/3
            "4": ("", ["somewhere"])}
    predictions = {k: v[0] for k, v in hand.items()}
    golds = {k: v[1] for k, v in hand.items()}
    ours, ref = metrics.squad_scores(predictions, golds), ref_evaluate(predictions, golds)
    assert ours["exact_match"] == pytest.approx(ref["exact_match"]) == 25.0
    assert ours["f1"] == pytest.approx(ref["f1"]) == pytest.approx(100 * (1 + 0.5 + 2 / 3 + 0) / 4)
    rng = np.random.default_rng(0)
    words = ["the", "a", "Tower", "tower", "Paris,", "1889", "in", "an", "old", "city.", "of", "France"]
    predictions, golds = {}, {}
    for i in range(500):
        predictions[str(i)] = " ".join(rng.choice(words, rng.integers(1, 6)))
        golds[str(i)] = [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(rng.integers(1, 4))]
        golds[str(i)] = [g for g in golds[str(i)] if ref_normalize_answer(g)] or ["Paris"]  # v1.1: no empty gold
    ours, ref = metrics.squad_scores(predictions, golds), ref_evaluate(predictions, golds)
    assert ours["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-9) and 0 < ours["f1"] < 100
    assert ours["f1"] == pytest.approx(ref["f1"], abs=1e-9)


def test_best_span_equals_an_exhaustive_search():
    rng = np.random.default_rng(1)
    for _ in range(200):
        t = int(rng.integers(8, 40))
        start, end = rng.normal(size=t), rng.normal(size=t)
        first = int(rng.integers(1, t // 2))
        offsets = [None] * first + [(5 * i, 5 * i + 4) for i in range(t - first - 1)] + [None]
        best = None
        for i in range(t):
            for j in range(i, min(t, i + 6)):
                if offsets[i] is not None and offsets[j] is not None:
                    score = start[i] + end[j]
                    if best is None or score > best[0]:
                        best = (score, offsets[i][0], offsets[j][1])
        got = answers.best_span(start, end, offsets, max_answer_length=6, n_best=t)
        assert got[1:] == best[1:] and got[0] == pytest.approx(best[0])


FILLER = ["The weather was mild that spring.", "Markets opened late on Monday.", "A new bridge crossed the river.",
          "Local schools closed for a week.", "The museum added a modern wing.", "Trains ran on a reduced timetable."]
FACTS = [("Who founded the observatory?", "The observatory was founded by {x}.", ["Ada Lovelace", "Carl Sagan",
                                                                                     "Vera Rubin", "Tycho Brahe"]),
         ("Where was the treaty signed?", "The treaty was signed in {x}.", ["Vienna", "Lisbon", "Oslo", "Quito"]),
         ("When did the festival start?", "The festival started in {x}.", ["1923", "1871", "2004", "1999"])]


def squad_file(path, n, seed, long=False):
    """A SQuAD v1.1 file: each context fillers around one fact; `long` contexts put the fact anywhere in
    about 60 - 150 tokens, so with short windows it is often in a later one."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for i in range(n):
        question, fact, options = FACTS[rng.integers(len(FACTS))]
        x = options[rng.integers(len(options))]
        before = [FILLER[k] for k in rng.integers(len(FILLER), size=rng.integers(0, 12 if long else 2))]
        after = [FILLER[k] for k in rng.integers(len(FILLER), size=rng.integers(0, 3))]
        prefix = " ".join(before + [fact.split("{x}")[0]]).lstrip()
        context = prefix + x + fact.split("{x}")[1] + (" " + " ".join(after) if after else "")
        paragraphs.append({"context": context, "qas": [{"id": f"q{i}", "question": question,
                                                        "answers": [{"text": x, "answer_start": len(prefix)}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "generated", "paragraphs": paragraphs}]}))
    return path


def test_squad_files_are_checked(tmp_path):
    good = squad_file(tmp_path / "a.json", 3, 0)
    assert [q.id for q in squad.read(good)] == ["q0", "q1", "q2"]
    data = json.loads(good.read_text())
    data["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 1
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"question id q1: answer .* is not the context's text at answer_start"):
        squad.read(tmp_path / "b.json")


def test_long_contexts_are_windowed_and_answers_found_in_later_windows(setup, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(setup / "model")
    questions = squad.read(squad_file(tmp_path / "long.json", 40, 2, long=True))
    rows, example_of, offsets = packing.qa_windows(tok, [q.question for q in questions],
                                                  [q.context for q in questions], 48, 16)
    starts, ends = squad.positions(questions, example_of, offsets)
    later = 0
    for e, q in enumerate(questions):
        windows = np.flatnonzero(example_of == e)
        holding = [w for w in windows if starts[w] > 0]
        assert holding, f"no window holds the answer of {q.id}"
        for w in holding:  # the labelled tokens' characters are the answer
            assert q.context[offsets[w][starts[w]][0]:offsets[w][ends[w]][1]] == q.answers[0][0]
        later += holding[0] != windows[0]
        assert all(rows["input_ids"][w][starts[w]] != tok.cls_token_id for w in holding)
    assert later >= 5  # answers that only a later window holds


@pytest.fixture(scope="module")
def reader(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    train, dev = squad_file(root / "train.json", 64, 3, long=True), squad_file(root / "dev.json", 16, 4, long=True)
    items = overrides(setup, **{"task": "question-answering", "data.train_file": train, "data.eval_file": dev,
                                "data.max_length": 48, "question-answering.stride": 16, "train.steps": 6,
                                "train.eval_every": 6, "train.checkpoint_every": 6})
    cli.main(["finetune", "--workdir", str(root / "run"), *items])
    return root / "run", dev


def reference_answers(model_dir, questions, max_length, stride, max_answer_length=30, n_best=20):
    """transformers' BertForQuestionAnswering on the fast tokenizer's own windows, the best valid span of the
    top-n starts and ends among the context's tokens over each question's windows (the question-answering
    pipeline's rule: other tokens masked before the top-n); several
    `model_dir`s: their logits averaged."""
    dirs = model_dir if isinstance(model_dir, list) else [model_dir]
    tok = transformers.AutoTokenizer.from_pretrained(dirs[0])
    members = [transformers.BertForQuestionAnswering.from_pretrained(d).eval() for d in dirs]
    out = []
    for q in questions:
        enc = tok(q.question, q.context, truncation="only_second", max_length=max_length, stride=stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
        best = None
        for w in range(len(enc["input_ids"])):
            with torch.no_grad():
                outs = [m(input_ids=torch.tensor([enc["input_ids"][w]]),
                          attention_mask=torch.tensor([enc["attention_mask"][w]]),
                          token_type_ids=torch.tensor([enc["token_type_ids"][w]])) for m in members]
            s = np.mean([o.start_logits[0].numpy() for o in outs], 0)
            e = np.mean([o.end_logits[0].numpy() for o in outs], 0)
            seq = enc.sequence_ids(w)
            context = np.asarray([x == 1 for x in seq])
            s, e = np.where(context, s, -np.inf), np.where(context, e, -np.inf)
            for i in np.argsort(-s)[:n_best]:
                for j in np.argsort(-e)[:n_best]:
                    if not (context[i] and context[j]) or j < i or j - i + 1 > max_answer_length:
                        continue
                    if best is None or s[i] + e[j] > best[0]:
                        best = (s[i] + e[j], enc["offset_mapping"][w][i][0], enc["offset_mapping"][w][j][1])
        out.append((q.context[best[1]:best[2]], float(best[0])))
    return out


def test_predict_qa_answers_as_transformers_and_scores_as_the_official_script(reader, capsys):
    run, dev = reader
    assert json.loads((run / "qa.json").read_text())["stride"] == 16
    capsys.readouterr()
    cli.main(["predict", "qa", "--model", str(run), "--data", str(dev)])
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    questions = squad.read(dev)
    assert [r["id"] for r in rows] == [q.id for q in questions]
    reference = reference_answers(run / "model", questions, 48, 16)
    for r, (text, score) in zip(rows, reference):  # the same span, or one of an equal score (a briefly trained
        assert r["answer"] == text or abs(r["score"] - score) < 1e-4, (r, text, score)  # model has near-ties)
        assert r["score"] == pytest.approx(score, abs=1e-4)
    assert sum(r["answer"] == text for r, (text, _) in zip(rows, reference)) >= len(rows) - 2
    for r, q in zip(rows, questions):
        assert q.context[r["start"]:r["end"]] == r["answer"]
    summary = json.loads(out.err.strip().splitlines()[-1])
    ref = ref_evaluate({r["id"]: r["answer"] for r in rows}, {q.id: [a for a, _ in q.answers] for q in questions})
    assert summary["exact_match"] == pytest.approx(ref["exact_match"], abs=0.01)
    assert summary["f1"] == pytest.approx(ref["f1"], abs=0.01)
    cli.main(["predict", "qa", "--model", str(run), "--question", questions[0].question, "--context",
              questions[0].context])
    assert json.loads(capsys.readouterr().out)["answer"] == rows[0]["answer"]


@pytest.mark.parametrize("method", ["adversarial", "distill"])
def test_the_methods_train_a_reader(method, reader, setup, tmp_path):
    run, dev = reader
    extra = {"adversarial": ["adversarial.epsilon=0.01"],
             "distill": [f"distill.teacher={run}", "distill.student_layers=1"]}[method]
    items = overrides(setup, **{"task": "question-answering", "data.train_file": dev, "data.max_length": 48,
                                "question-answering.stride": 16, "train.steps": 2, "train.eval_every": 2,
                                "train.checkpoint_every": 2})
    cli.main([method, "--workdir", str(tmp_path / "run"), *items, *extra])
    assert (tmp_path / "run" / "qa.json").is_file()


def test_a_reader_exports_and_serves_answers(reader, tmp_path):
    """Export -> the artifact in-process -> the loader -> the server over HTTP (/predict in the
    question-answering pipeline's shape, KServe v2 with question and context tensors): the run's answers."""
    from conftest import Server

    from jaxopt_llm import inference
    from jaxopt_llm.serving.artifact import Artifact

    run, dev = reader
    cli.main(["export", str(run), "--out", str(tmp_path / "art")])
    art = Artifact.load(tmp_path / "art")
    assert art.manifest["kind"] == "reader" and art.manifest["qa"]["stride"] == 16
    questions = squad.read(dev)
    qs, cs = [q.question for q in questions], [q.context for q in questions]
    expected = inference.load(run).answer(qs, cs)

    def same(a, b):  # the same spans, up to near-ties of a briefly trained model (then equal scores)
        np.testing.assert_allclose([x["score"] for x in a], [x["score"] for x in b], atol=1e-4)
        differ = [(x, y) for x, y in zip(a, b) if (x["answer"], x["start"], x["end"]) != (y["answer"], y["start"],
                                                                                             y["end"])]
        assert len(differ) <= 2, differ

    same(art.answer(qs, cs), expected)
    same(inference.load(tmp_path / "art").answer(qs, cs), expected)
    server = Server(art)
    try:
        status, rows = server.post("/predict", {"inputs": [{"question": q, "context": c} for q, c in zip(qs, cs)]})
        assert status == 200
        same(rows, expected)
        status, row = server.post("/predict", {"inputs": {"question": qs[0], "context": cs[0]}})
        assert status == 200
        same([row], expected[:1])
        status, body = server.post("/predict", {"inputs": {"question": qs[0]}})
        assert status == 422 and '"context"' in body["error"]
        status, body = server.post(f"/v2/models/{art.name}/infer", {"inputs": [
            {"name": "question", "shape": [len(qs)], "datatype": "BYTES", "data": qs},
            {"name": "context", "shape": [len(cs)], "datatype": "BYTES", "data": cs}]})
        assert status == 200 and body["outputs"][0]["name"] == "answer"
        same([{"answer": a, "score": s, "start": b, "end": e} for a, s, b, e in zip(
            *(o["data"] for o in body["outputs"]))], expected)
    finally:
        server.close()


def test_an_ensemble_of_readers_answers_with_its_members_mean_logits(setup, reader, tmp_path):
    from jaxopt_llm import inference

    _, dev = reader
    items = overrides(setup, **{"task": "question-answering", "data.train_file": dev, "data.max_length": 48,
                                "question-answering.stride": 16, "train.steps": 2, "train.eval_every": 2,
                                "train.checkpoint_every": 2})
    cli.main(["finetune", "--workdir", str(tmp_path / "ens"), *items, "method=ensemble", "ensemble.members=2"])
    model = inference.load(tmp_path / "ens")
    assert model.kind == "reader" and len(model.members) == 2 and model.options["stride"] == 16
    questions = squad.read(dev)
    got = model.answer([q.question for q in questions], [q.context for q in questions])
    reference = reference_answers([str(m) for m in model.members], questions, 48, 16)
    for r, (text, score) in zip(got, reference):  # the same span, or one of an equal score (near-ties)
        assert r["score"] == pytest.approx(score, abs=1e-4)
    assert sum(r["answer"] == text for r, (text, _) in zip(got, reference)) >= len(got) - 2



def test_a_qa_pipeline_measures_exact_match_and_f1_as_the_official_script_and_its_export_agrees(setup, tmp_path):
    from test_tokens import PIPELINE

    from jaxopt_llm import pipeline

    source = squad_file(tmp_path / "all.json", 64, 6, long=True)
    items = {k: v for k, v in (i.split("=", 1) for i in overrides(
        setup, **{"data.max_length": 48, "question-answering.stride": 16, "train.steps": 16,
                  "train.learning_rate": 5e-3, "train.eval_every": 16, "train.checkpoint_every": 16}))
             if k not in ("model.name_or_path", "data.train_file", "data.label_column")}
    file = tmp_path / "qa.py"
    file.write_text(PIPELINE.format(file=file, name="qa", source=str(source), task="question-answering",
                                    examples=(), length=48, model=str(setup / "model"), items=items))
    rows = {r["name"]: r for r in pipeline.run(pipeline.load(file), tmp_path / "work")}
    lines = [json.loads(x) for x in (rows["tuned"]["folder"] / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 16
    want = ref_evaluate({x["id"]: x["answer"] for x in lines}, {x["id"]: x["gold"] for x in lines})
    tuned, deploy = rows["tuned"]["metrics"], rows["deploy"]["metrics"]
    assert want["f1"] > 0  # answers that overlap the gold ones: the comparison is not of zeros
    assert tuned["exact_match"] == pytest.approx(want["exact_match"]) and tuned["qa_f1"] == pytest.approx(want["f1"])
    for key in ("exact_match", "qa_f1"):  # the exported artifact answers as the run does
        assert deploy[key] == pytest.approx(tuned[key], abs=1e-9)
    report = (tmp_path / "work" / "report.html").read_text()
    assert "QA F1" in report and "questions" in report and "accuracy" not in report.split("<table")[1]


def test_sweep_eval_scores_readers_as_the_official_script_scores_their_answers(reader, capsys):
    from jaxopt_llm import inference

    run, dev = reader
    cli.main(["sweep", "eval", "--model", str(run), "--checkpoints", "all", "--data", str(dev), "--batch-size", "8"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["step"] for r in rows] == [6]
    questions = squad.read(dev)
    found = inference.load(run).answer([q.question for q in questions], [q.context for q in questions])
    want = ref_evaluate({q.id: r["answer"] for q, r in zip(questions, found)},
                        {q.id: [a for a, _ in q.answers] for q in questions})
    assert rows[0]["exact_match"] == pytest.approx(want["exact_match"]) and rows[0]["f1"] == pytest.approx(want["f1"])
