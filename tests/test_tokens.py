"""Token classification: entity metrics against the `seqeval` package (strict mode, IOB2 and IOBES) on random
tag sequences, on the host and on device; CoNLL / JSON-lines reading with line numbers in errors; sub-token
alignment; training from the command line (clean, adversarial, distillation, ensemble) on a generated NER set;
the saved model reloaded by transformers' BertForTokenClassification."""

import json

import numpy as np
import pytest
import seqeval.metrics
import torch
import transformers
from conftest import overrides
from seqeval.scheme import IOB2, IOBES

from jaxopt_llm import cli, metrics
from jaxopt_llm.data import DataError, tagged

TYPES = ("PER", "LOC", "ORG")


def random_tags(rng, scheme, n, length, valid_only=False):
    """Tag sequences of random prefixes and types: well-formed and malformed chains alike."""
    prefixes = ["O", "B", "I"] + (["E", "S"] if scheme == "IOBES" else [])
    out = []
    for _ in range(n):
        seq = []
        for _ in range(rng.integers(1, length)):
            p = prefixes[rng.integers(len(prefixes))]
            seq.append("O" if p == "O" else f"{p}-{TYPES[rng.integers(2)]}")
        out.append(seq)
    return out


@pytest.mark.parametrize("scheme", ["IOB2", "IOBES"])
def test_entity_scores_equal_seqeval_strict_on_random_sequences(scheme):
    rng = np.random.default_rng(0)
    true = random_tags(rng, scheme, 300, 12)
    pred = [[t if rng.random() < 0.6 else random_tags(rng, scheme, 1, 2)[0][0] for t in seq] for seq in true]
    ours = metrics.entity_scores(true, pred, scheme)
    mode = {"mode": "strict", "scheme": IOB2 if scheme == "IOB2" else IOBES}
    assert ours["true"] > 50 and 0 < ours["tp"] < ours["predicted"]
    assert ours["precision"] == pytest.approx(seqeval.metrics.precision_score(true, pred, **mode), abs=1e-12)
    assert ours["recall"] == pytest.approx(seqeval.metrics.recall_score(true, pred, **mode), abs=1e-12)
    assert ours["f1"] == pytest.approx(seqeval.metrics.f1_score(true, pred, **mode), abs=1e-12)


@pytest.mark.parametrize("scheme", ["IOB2", "IOBES"])
def test_entity_sums_on_device_equal_the_host_count_with_ignored_positions_between_words(scheme):
    """Word tags spread over sub-token rows (later sub-tokens, specials and padding unlabelled): the device
    count reads the labelled positions in order, as the host count reads the words."""
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    names = ["O"] + [f"{p}-{k}" for k in TYPES[:2] for p in ("BIES" if scheme == "IOBES" else "BI")]
    true = random_tags(rng, scheme, 64, 10)
    pred = random_tags(rng, scheme, 64, 10)
    t = 32
    gold_bt, pred_bt, where_bt = (np.full((64, t), -100, np.int32), np.zeros((64, t), np.int32),
                                  np.zeros((64, t), bool))
    for r in range(64):
        words = min(len(true[r]), len(pred[r]))
        true[r], pred[r] = true[r][:words], pred[r][:words]
        cols = np.sort(rng.choice(np.arange(1, t), words, replace=False))  # gaps: later sub-tokens
        gold_bt[r, cols] = [names.index(x) for x in true[r]]
        pred_bt[r, cols] = [names.index(x) for x in pred[r]]
        pred_bt[r, ~np.isin(np.arange(t), cols)] = rng.integers(0, len(names), t - words)  # noise, unread
        where_bt[r, cols] = True
    prefix, kind = metrics.tag_tables(names, scheme)
    sums = np.asarray(metrics.entity_sums(jnp.asarray(gold_bt), jnp.asarray(pred_bt), jnp.asarray(where_bt),
                                          prefix, kind, scheme))
    host = metrics.entity_scores(true, pred, scheme)
    assert host["true"] > 20
    np.testing.assert_array_equal(sums, [host["tp"], host["predicted"], host["true"]])


def test_conll_and_jsonl_reading_checks_schemes_with_line_numbers(tmp_path):
    conll = tmp_path / "a.conll"
    conll.write_text("-DOCSTART- -X- O\n\nJohn NNP B-PER\nlives VBZ O\nin IN O\nParis NNP B-LOC\n\n"
                     "Mary B-PER\nSmith I-PER\n")
    sentences = tagged.check(tagged.read(conll), "IOB2", str(conll))
    assert [s.words for s in sentences] == [["John", "lives", "in", "Paris"], ["Mary", "Smith"]]
    assert sentences[1].lines == [8, 9] and tagged.label_names(sentences) == ("O", "B-LOC", "B-PER", "I-PER")
    bad = tmp_path / "b.conll"
    bad.write_text("John B-PER\n\nlives O\nParis I-LOC\n")
    with pytest.raises(DataError, match=r"b.conll:4: I-LOC follows O.*scheme=IOB1"):
        tagged.check(tagged.read(bad), "IOB2", str(bad))
    converted = tagged.check(tagged.read(bad), "IOB1", str(bad))  # IOB1 opens entities with I-
    assert converted[1].tags == ["O", "B-LOC"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"tokens": ["a", "b"], "tags": ["S-PER", "O"]}) + "\n\n"
                     + json.dumps({"tokens": ["a"], "tags": ["O", "O"]}) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:3: 1 tokens but 2 tags"):
        tagged.read(jsonl)
    with pytest.raises(DataError, match=r"c.jsonl:1: tag 'S-PER' is not a IOB2 tag"):
        tagged.check(tagged.read(tmp_path / "a.conll"), "IOB2", "x") and tagged.check(
            [tagged.Sentence(["a", "b"], ["S-PER", "O"], [1, 1])], "IOB2", str(jsonl))


def test_alignment_labels_first_sub_tokens_or_all(setup):
    tok = transformers.AutoTokenizer.from_pretrained(setup / "model")
    sentence = tagged.Sentence(["Johnathan", "visited", "Zxqvbrtkum"], ["B-PER", "O", "B-LOC"], [1, 2, 3])
    names = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
    first = tagged.align(tok, [sentence], names, 16)
    every = tagged.align(tok, [sentence], names, 16, all_subtokens=True)
    words = tok(sentence.words, is_split_into_words=True).word_ids()
    assert words.count(2) > 1  # the last word is several sub-tokens
    for c, w in enumerate(words):
        expected_first = -100 if w is None or (c and words[c - 1] == w) else names.index(sentence.tags[w])
        assert first["labels"][0, c] == expected_first
        assert first["word_starts"][0, c] == (expected_first >= 0)
        if w == 2 and words[c - 1] == 2:
            assert every["labels"][0, c] == names.index("I-LOC")


PEOPLE = ["John Smith", "Mary", "Ahmed Khan", "Li Wei", "Sofia", "Carlos Diaz", "Anna Berg", "Tom"]
PLACES = ["Paris", "New York", "Lagos", "Tokyo", "Lima", "Oslo", "Cape Town", "Delhi"]
FRAMES = ["{p} flew to {l} yesterday", "yesterday {p} said {l} was lovely", "{p} lives in {l}",
          "the team met {p} near {l}", "{l} welcomed {p}"]


def ner_file(path, n, seed):
    """A CoNLL file of generated sentences with PER and LOC entities (IOB2)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        p, l_ = PEOPLE[rng.integers(len(PEOPLE))], PLACES[rng.integers(len(PLACES))]
        for piece in FRAMES[rng.integers(len(FRAMES))].split():
            if piece in ("{p}", "{l}"):
                words, kind = (p, "PER") if piece == "{p}" else (l_, "LOC")
                lines += [f"{w} {'B' if i == 0 else 'I'}-{kind}" for i, w in enumerate(words.split())]
            else:
                lines.append(f"{piece} O")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    return ner_file(root / "train.conll", 96, 0), ner_file(root / "eval.conll", 24, 1)


def token_items(setup, ner_data, **extra):
    train, eval_ = ner_data
    return overrides(setup, **{"task": "token-classification", "data.train_file": train, "data.eval_file": eval_,
                               "data.max_length": 24, "train.steps": 4, "train.eval_every": 4,
                               "train.checkpoint_every": 4, **extra})


@pytest.fixture(scope="module")
def tagger(setup, ner_data, tmp_path_factory):
    """A token classifier fine-tuned from the command line (clean method)."""
    run = tmp_path_factory.mktemp("tagger") / "run"
    cli.main(["finetune", "--workdir", str(run), *token_items(setup, ner_data, **{"train.steps": 8})])
    return run


def test_a_token_classifier_trains_and_saves_what_transformers_reloads(tagger):
    run = tagger
    tagging = json.loads((run / "tagging.json").read_text())
    assert tagging == {"scheme": "IOB2", "labels": ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in evals if m["split"] == "eval"][-1]
    assert {"f1", "precision", "recall", "accuracy"} <= set(final) and 0 <= final["f1"] <= 1
    reloaded = transformers.BertForTokenClassification.from_pretrained(run / "model").eval()
    assert reloaded.config.id2label[3] == "B-PER"
    from jaxopt_llm import models

    ours = models.from_pretrained(run / "model", "token-classification")
    tok = transformers.AutoTokenizer.from_pretrained(run / "model")
    enc = tok(["John Smith flew to Oslo", "Mary"], padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids, attention_mask=mask)), theirs, atol=1e-5)


@pytest.mark.parametrize("method", ["adversarial", "distill", "ensemble"])
def test_the_methods_train_a_token_classifier(method, setup, ner_data, tagger, tmp_path):
    """Adversarial (delta per token), distillation (per-token KL from the trained tagger) and a 2-member
    ensemble (member statistics per token) run on the task and keep its tagging.json."""
    extra = {"adversarial": ["adversarial.epsilon=0.01"], "ensemble": ["method=ensemble", "ensemble.members=2"],
             "distill": [f"distill.teacher={tagger}", "distill.student_layers=1"]}[method]
    command = "finetune" if method == "ensemble" else method
    cli.main([command, "--workdir", str(tmp_path / "run"), *token_items(setup, ner_data), *extra])
    assert json.loads((tmp_path / "run" / "tagging.json").read_text())["scheme"] == "IOB2"


def reference_entities(model_dir, text, max_length):
    """Entities by hand from transformers: BertForTokenClassification's probabilities on the fast tokenizer's
    encoding, each word tagged by its first sub-token, B-/I- of one type joined (aggregation "first")."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.BertForTokenClassification.from_pretrained(model_dir).eval()
    enc = tok(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].softmax(-1).numpy()
    words = {}
    for i, w in enumerate(enc.word_ids()):
        if w is None:
            continue
        if w not in words:
            words[w] = [model.config.id2label[int(probs[i].argmax())], float(probs[i].max()), *enc["offset_mapping"][i]]
        words[w][3] = enc["offset_mapping"][i][1]
    out, current = [], None
    for tag, score, start, end in (words[w] for w in sorted(words)):
        prefix, _, kind = tag.partition("-")
        if current and prefix == "I" and kind == current[0]:
            current[1].append(score)
            current[3] = end
            continue
        if current:
            out.append(current)
        current = [kind, [score], start, end] if prefix != "O" else None
    if current:
        out.append(current)
    return [{"entity_group": k, "score": float(np.mean(s)), "word": text[a:b], "start": a, "end": b}
            for k, s, a, b in out]


def test_predict_ner_prints_entities_with_character_offsets_as_transformers_gives_them(tagger, capsys):
    """Texts of every length (past the run's 24 tokens: cut there), through `predict ner` and
    `inference.load(...).tag`, against the entities built by hand from transformers' outputs."""
    from jaxopt_llm import inference

    rng = np.random.default_rng(3)
    texts = [" ".join(f"{PEOPLE[rng.integers(8)]} met {PLACES[rng.integers(8)]}," for _ in range(k))
             for k in (1, 2, 3, 5, 9)] + ["Zxqvbrtkum Oslo", "ok"]
    capsys.readouterr()
    cli.main(["predict", "ner", "--model", str(tagger), *texts])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in printed] == texts
    model = inference.load(tagger)
    assert model.kind == "tagger" and model.max_length == 24
    for text, row, tagged_ in zip(texts, printed, model.tag(texts)):
        expected = reference_entities(tagger / "model", text, 24)
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in row["entities"]] == [
            (e["entity_group"], e["start"], e["end"], e["word"]) for e in expected]
        np.testing.assert_allclose([e["score"] for e in row["entities"]], [e["score"] for e in expected], atol=1e-5)
        assert tagged_ == row["entities"]
        for e in row["entities"]:
            assert text[e["start"]:e["end"]] == e["word"]
    assert sum(len(p["entities"]) for p in printed) > 0  # the tagger found entities to compare


def test_aggregations_follow_the_pipelines_shapes(tagger):
    from jaxopt_llm import inference

    model = inference.load(tagger)
    text = "John Smith flew to Cape Town yesterday"
    none, simple = model.tag([text], "none")[0], model.tag([text], "simple")[0]
    assert all({"entity", "score", "index", "word", "start", "end"} == set(e) for e in none)
    assert all({"entity_group", "score", "word", "start", "end"} == set(e) for e in simple)
    with pytest.raises(Exception, match="aggregation='max'"):
        model.tag([text], "max")


def test_a_tagger_is_never_read_as_a_text_classifier(tagger, tmp_path, capsys):
    """Its classifier kernel has a text classifier's shape: loading it as one would silently add a random
    pooler. predict classify refuses it, from the run, its model folder and its artifact."""
    from jaxopt_llm import inference

    cli.main(["export", str(tagger), "--out", str(tmp_path / "art")])
    capsys.readouterr()
    for model in (tagger, tagger / "model", tmp_path / "art"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["predict", "classify", "--model", str(model), "John met Mary"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and ("token classifier" in err or "tagger artifact" in err), err
    with pytest.raises(Exception, match="not a token classifier"):
        inference.load(tagger, kind="encoder").tag(["x"])


def test_a_tagger_exports_and_serves_its_entities(tagger, tmp_path):
    """Export -> artifact in-process -> the loader -> the server over HTTP (/predict with each aggregation,
    KServe v2): the entities the run itself gives, on texts past its length."""
    from conftest import Server

    from jaxopt_llm import inference
    from jaxopt_llm.serving.artifact import Artifact

    cli.main(["export", str(tagger), "--out", str(tmp_path / "art")])
    art = Artifact.load(tmp_path / "art")
    assert art.manifest["kind"] == "tagger" and art.manifest["max_length"] == 24
    texts = ["John Smith flew to Cape Town", " ".join(["Mary met Tom in Lima,"] * 8), "ok"]
    run = inference.load(tagger)

    def same(a, b):
        assert [[{k: v for k, v in e.items() if k != "score"} for e in row] for row in a] == [
            [{k: v for k, v in e.items() if k != "score"} for e in row] for row in b]
        np.testing.assert_allclose([e["score"] for row in a for e in row], [e["score"] for row in b for e in row],
                                   atol=1e-5)

    for aggregation in ("first", "simple", "none"):
        same(art.tag(texts, aggregation), run.tag(texts, aggregation))
    same(inference.load(tmp_path / "art").tag(texts), run.tag(texts))
    server = Server(art)
    try:
        for aggregation in ("first", "simple", "none"):
            status, rows = server.post("/predict", {"inputs": texts,
                                                    "parameters": {"aggregation_strategy": aggregation}})
            assert status == 200
            same(rows, run.tag(texts, aggregation))
        status, row = server.post("/predict", {"inputs": texts[0]})
        assert status == 200 and row == server.post("/predict", {"inputs": [texts[0]]})[1][0]
        status, body = server.post("/predict", {"inputs": texts, "parameters": {"aggregation_strategy": "max"}})
        assert status == 422 and "aggregation_strategy" in body["error"]
        status, body = server.post(f"/v2/models/{art.name}/infer", {"inputs": [
            {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]})
        assert status == 200 and body["outputs"][0]["name"] == "entities"
        same([json.loads(x) for x in body["outputs"][0]["data"]], run.tag(texts))
    finally:
        server.close()


def test_an_ensemble_of_taggers_tags_with_its_members_mean_probabilities(setup, ner_data, tmp_path):
    """A 2-member ensemble run: `predict ner` (aggregation none) gives, per tagged sub-token, the tag and
    score of the members' mean probabilities as transformers computes each member's."""
    from jaxopt_llm import inference

    cli.main(["finetune", "--workdir", str(tmp_path / "ens"), *token_items(setup, ner_data),
              "method=ensemble", "ensemble.members=2"])
    model = inference.load(tmp_path / "ens")
    assert model.kind == "tagger" and len(model.members) == 2
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ens" / "members" / "0")
    members = [transformers.BertForTokenClassification.from_pretrained(m).eval() for m in model.members]
    texts = ["John Smith flew to Cape Town", "Mary met Tom in Lima yesterday"]
    compared = 0
    for text, got in zip(texts, model.tag(texts, "none")):
        enc = tok(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            probs = torch.stack([m(**enc).logits[0].softmax(-1) for m in members]).mean(0).numpy()
        names = members[0].config.id2label
        expected = [(i, names[int(p.argmax())], float(p.max())) for i, p in enumerate(probs)
                    if 0 < i < len(probs) - 1 and names[int(p.argmax())] != "O"]
        assert [(e["index"], e["entity"]) for e in got] == [(i, tag) for i, tag, _ in expected]
        np.testing.assert_allclose([e["score"] for e in got], [s for _, _, s in expected], atol=1e-5)
        compared += len(expected)
    assert compared > 0


PIPELINE = '''"""jaxopt-llm pipeline run {file}"""
from jaxopt_llm.pipeline import Pipeline, Split, Stage


def get_pipeline():
    return Pipeline(
        name="{name}", data=Split(source={source!r}, task={task!r}, test_size=16, dev_size=8),
        examples={examples!r}, max_length={length}, batch_size=8,
        stages=(Stage("tuned", "finetune", model={model!r}, overrides={items!r}),
                Stage("deploy", "export", model="@tuned")))
'''


def test_a_tagging_pipeline_measures_entity_f1_as_seqeval_counts_it_and_its_export_agrees(setup, tmp_path):
    from jaxopt_llm import pipeline

    source = ner_file(tmp_path / "all.conll", 72, 5)
    items = {k: v for k, v in (i.split("=", 1) for i in overrides(
        setup, **{"data.max_length": 24, "train.steps": 24, "train.learning_rate": 5e-3, "train.eval_every": 24,
                  "train.checkpoint_every": 24}))
             if k not in ("model.name_or_path", "data.train_file", "data.label_column")}
    file = tmp_path / "ner.py"
    file.write_text(PIPELINE.format(file=file, name="ner", source=str(source), task="token-classification",
                                    examples=("Ada Lovelace flew to Oslo",), length=24, model=str(setup / "model"),
                                    items=items))
    with pytest.raises(pipeline.PipelineError, match="a calibrate stage works on classification data"):
        bad = pipeline.load(file)
        pipeline.plan(bad.__class__(**{**bad.__dict__, "stages": (
            *bad.stages, pipeline.Stage("cal", "calibrate", model="@tuned"))}), tmp_path / "bad")
    rows = {r["name"]: r for r in pipeline.run(pipeline.load(file), tmp_path / "work")}
    lines = [json.loads(x) for x in (rows["tuned"]["folder"] / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and any(t != "O" for x in lines for t in x["predicted"])  # it found entities
    gold, predicted = [x["tags"] for x in lines], [x["predicted"] for x in lines]
    tuned, deploy = (rows[n]["metrics"] for n in ("tuned", "deploy"))
    assert tuned["entity_f1"] == pytest.approx(seqeval.metrics.f1_score(gold, predicted, mode="strict",
                                                                        scheme=IOB2), abs=1e-9)
    assert tuned["entity_precision"] == pytest.approx(seqeval.metrics.precision_score(
        gold, predicted, mode="strict", scheme=IOB2), abs=1e-9)
    assert tuned["word_accuracy"] == pytest.approx(np.mean([a == b for g, p in zip(gold, predicted)
                                                            for a, b in zip(g, p)]))
    for key in ("entity_f1", "word_accuracy"):  # the exported artifact tags as the run does
        assert deploy[key] == pytest.approx(tuned[key], abs=1e-9)
    report = (tmp_path / "work" / "report.html").read_text()
    assert "entity F1" in report and "macro-F1" not in report and "sentences" in report
    assert "pipeline_tag: token-classification" in (tmp_path / "work" / "model_card.md").read_text()


def test_sweep_eval_scores_a_taggers_checkpoints_as_seqeval_scores_its_predictions(tagger, ner_data, capsys):
    from jaxopt_llm import inference, tagging

    _, eval_file = ner_data
    cli.main(["sweep", "eval", "--model", str(tagger), "--checkpoints", "all", "--data", str(eval_file),
              "--batch-size", "8"])
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["step"] for r in rows] == [4, 8]
    sentences = tagged.read(eval_file)
    _, predicted = tagging.score(inference.load(tagger), sentences)  # the run's model: the last checkpoint's
    gold = [s.tags for s in sentences]
    assert rows[1]["f1"] == pytest.approx(seqeval.metrics.f1_score(gold, predicted, mode="strict", scheme=IOB2))
    assert rows[1]["recall"] == pytest.approx(seqeval.metrics.recall_score(gold, predicted, mode="strict",
                                                                           scheme=IOB2))
    assert rows[0] != rows[1]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "eval", "--model", str(tagger), "--data", str(eval_file), "temperature=1,2"])
    assert exit_info.value.code == 2 and "without a temperature or epsilon grid" in capsys.readouterr().err
