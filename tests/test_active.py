"""Active learning: each strategy against a hand computation on a constructed pool, the Label Studio round
trip, crashes between query and import, bad label files, and two rounds end to end through the CLI."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import overrides

from jaxopt_llm import active, cli

PROBS = np.array([[0.90, 0.05, 0.05],   # confident
                  [0.40, 0.35, 0.25],   # unsure, small margin
                  [0.60, 0.30, 0.10],
                  [0.34, 0.33, 0.33]])  # flattest


def test_uncertainty_strategies_pick_what_a_hand_computation_picks():
    # least confidence 1 - max p: 0.10, 0.60, 0.40, 0.66
    assert active.pick("least-confidence", 4, 0, probs=PROBS) == [3, 1, 2, 0]
    h = [-sum(p * np.log(p) for p in row) for row in PROBS]
    assert active.pick("entropy", 4, 0, probs=PROBS) == list(np.argsort(h)[::-1])
    # margins between the two likeliest: 0.85, 0.05, 0.30, 0.01
    assert active.pick("breaking-ties", 2, 0, probs=PROBS) == [3, 1]
    assert active.pick("random", 3, 7, probs=PROBS) == list(np.random.default_rng([7, 5]).permutation(4)[:3])


def test_bald_prefers_members_that_disagree():
    agree = np.array([[0.5, 0.5], [0.5, 0.5]])  # both unsure: high entropy, no mutual information
    disagree = np.array([[0.95, 0.05], [0.05, 0.95]])  # each sure, of different classes
    members = np.stack([np.stack([agree[0], disagree[0]]), np.stack([agree[1], disagree[1]])])  # (2, n=2, c=2)
    mi = active.scores("bald", member_probs=members)
    h = lambda p: -np.sum(p * np.log(p))  # noqa: E731
    assert mi[0] == pytest.approx(0.0, abs=1e-9)
    assert mi[1] == pytest.approx(h(np.array([0.5, 0.5])) - h(np.array([0.95, 0.05])), abs=1e-9)
    assert active.pick("bald", 1, 0, member_probs=members) == [1]


def test_diversity_strategies():
    line = np.array([[0.0], [1.0], [2.0], [10.0]])
    # k-center from point 0: farthest is 10, then 2 (min distance 2 to {0, 10}) before 1
    assert active.coreset(line, 3) == [0, 3, 2]
    assert active.coreset(line, 1, labelled=np.array([[9.0]])) == [0]  # farthest from what is labelled
    clusters = np.concatenate([np.random.default_rng(0).normal(0, 0.1, (10, 2)),
                               np.random.default_rng(1).normal(5, 0.1, (10, 2))])
    assert sorted(i // 10 for i in active.kmeans(clusters, 2, seed=0)) == [0, 1]  # one from each cluster


def test_a_label_studio_round_trip_keeps_every_label(tmp_path):
    items = [{"id": f"t{i}", "text": f"text {i}", "prediction": "pos", "score": 0.8} for i in range(4)]
    active.write_items(items, tmp_path / "tasks.json", "labelstudio", ["neg", "pos"], 0)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == ["pos"]  # pre-annotation
    # a person labels in Label Studio: two answered, one cancelled (skipped), one relabelled twice
    tasks[0]["annotations"] = [{"result": [{"value": {"choices": ["neg"]}}], "was_cancelled": False}]
    tasks[1]["annotations"] = [{"result": [{"value": {"choices": ["pos"]}}], "was_cancelled": False}]
    tasks[2]["annotations"] = [{"result": [], "was_cancelled": True}]
    tasks[3]["annotations"] = [{"result": [{"value": {"choices": ["pos"]}}]},
                               {"result": [{"value": {"choices": ["neg"]}}], "was_cancelled": False}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    assert active.read_answers(tmp_path / "export.json") == {"t0": "neg", "t1": "pos", "t2": None, "t3": "neg"}
    for fmt in ("csv", "jsonl"):  # the other formats round-trip too
        active.write_items(items, tmp_path / f"items.{fmt}", fmt, ["neg", "pos"], 0)
        text = (tmp_path / f"items.{fmt}").read_text()
        if fmt == "csv":
            rows = list(csv.DictReader(text.splitlines()))
            rows[1]["label"] = "neg"
            with (tmp_path / "items.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, rows[0].keys())
                writer.writeheader()
                writer.writerows(rows)
        else:
            rows = [json.loads(line) for line in text.splitlines()]
            rows[1]["label"] = "neg"
            (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert active.read_answers(tmp_path / f"items.{fmt}") == {"t0": None, "t1": "neg", "t2": None, "t3": None}


@pytest.fixture()
def pool(setup, tmp_path):
    rows = list(csv.DictReader((setup / "tweets.csv").read_text().splitlines()))
    file = tmp_path / "pool.jsonl"
    file.write_text("".join(json.dumps({"id": f"p{i}", "text": r["text"], "gold": r["sentiment"]}) + "\n"
                            for i, r in enumerate(rows)))
    return file


def test_a_crash_between_query_and_import_loses_nothing(pool, tmp_path, monkeypatch):
    rounds = active.Rounds.init(tmp_path / "al", str(pool), ["negative", "neutral", "positive"], None, None, "random")
    first = rounds.query(5)
    again = active.Rounds(tmp_path / "al").query(5)  # the process died after querying: the same items
    assert [x["id"] for x in again] == [x["id"] for x in first]
    rounds.import_answers({first[0]["id"]: "negative", first[1]["id"]: None})
    before = rounds.labelled_file.read_bytes()

    def crash(source, target):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)  # the rename that completes a whole-file write
    with pytest.raises(OSError):
        rounds.import_answers({first[2]["id"]: "positive"})
    monkeypatch.undo()
    assert rounds.labelled_file.read_bytes() == before  # what was labelled is intact
    result = rounds.import_answers({first[0]["id"]: "neutral", first[2]["id"]: "positive"})
    assert result["replaced"] == 1 and result["added"] == 1
    assert {r["id"]: r["label"] for r in rounds.labelled()} == {first[0]["id"]: "neutral", first[2]["id"]: "positive"}


def test_label_rounds_are_idempotent_and_an_empty_import_leaves_the_round_open(pool, tmp_path):
    rounds = active.Rounds.init(tmp_path / "al", str(pool), ["negative", "neutral", "positive"], None, None, "random")
    first = rounds.query(3)
    with pytest.raises(active.LabelError, match="add no label .*round 0 stays open"):
        rounds.import_answers({first[0]["id"]: None, first[1]["id"]: None})  # all skipped
    assert rounds.round() == 0 and not rounds.labelled_file.exists()
    answers = {first[0]["id"]: "negative", first[1]["id"]: "positive", first[2]["id"]: None}
    assert rounds.import_answers(answers)["added"] == 2 and rounds.round() == 1
    before = rounds.labelled_file.read_bytes()
    again = rounds.import_answers(answers)  # the same file twice: nothing changes
    assert again["unchanged"] and rounds.labelled_file.read_bytes() == before and rounds.round() == 1


@pytest.mark.parametrize("content, message", [
    ('{"id": "nope", "label": "negative"}\n{"id": "p1", "label": "negative"}\n',
     r"ids not in the pool: 'nope' \(line 1\)"),
    ('{"id": "p1", "label": "angry"}\n{"id": "p2", "label": "glad"}\n',
     r"labels not among .*: 'angry' for 'p1' \(line 1\), 'glad' for 'p2' \(line 2\)"),
    ('{"id": "p1", "sentiment": "negative"}\n', r"line 1 needs id and label"),
    ("[{broken", r"is not valid JSON"),
    ("", r"holds no answers"),
    ('{"id": "p1", "label": "negative"}\n{"id": "p1", "label": "positive"}\n',
     r"answers the same id more than once: 'p1' \(line 1 and line 2\)"),
    ('[{"data": {"pool_id": "p1"}, "annotations": [{"result": [{"value": {"choices": ["negative"]}}]}]},'
     ' {"data": {"pool_id": "p1"}}]', r"answers the same id more than once: 'p1' \(task 1 and task 2\)"),
    ('[{"data": {"pool_id": "p1"}, "annotations": "negative"}]', r"task 1: not a Label Studio task"),
    ('[{"data": {"pool_id": "p1"}, "annotations": [{"result": [{"value": {"choices": [3]}}]}]}]',
     r"task 1: not a Label Studio task .*choices must be a list of label names"),
    ("{", r"line 1: not valid JSON"),
])
def test_bad_label_files_are_one_clear_error_and_import_nothing(pool, tmp_path, capsys, content, message):
    active.Rounds.init(tmp_path / "al", str(pool), ["negative", "neutral", "positive"], None, None, "random")
    file = tmp_path / ("answers.json" if content.startswith("[") else "answers.jsonl")
    if content == "":
        file = tmp_path / "answers.csv"
        content = "id,label\n"  # a header alone
    file.write_text(content)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["label", "import", str(file), "--state", str(tmp_path / "al")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and __import__("re").search(message, err), err
    assert not (tmp_path / "al" / "labelled.jsonl").exists()


def test_two_rounds_through_the_cli(pool, setup, tmp_path, capsys):
    run = str(tmp_path / "al")
    items = overrides(setup, **{"train.steps": 2, "train.batch_size": 8})
    items = [i for i in items if not i.startswith(("data.train_file", "data.label_column"))]
    cli.main(["label", "init", "--state", run, "--pool", str(pool), "--labels", "negative,neutral,positive",
              "--strategy", "entropy", *items])
    gold = {json.loads(line)["id"]: json.loads(line)["gold"] for line in pool.read_text().splitlines()}
    for round_ in range(2):
        out = tmp_path / f"round{round_}.csv"
        cli.main(["label", "query", "--state", run, "--n", "24", "--out", str(out)])
        rows = list(csv.DictReader(out.read_text().splitlines()))
        assert len(rows) == 24 and (round_ == 0) == (rows[0]["prediction"] == "")  # a model pre-annotates round 1
        for r in rows:
            r["label"] = gold[r["id"]]
        with out.open("w", newline="") as f:
            writer = csv.DictWriter(f, rows[0].keys())
            writer.writeheader()
            writer.writerows(rows)
        cli.main(["label", "import", str(out), "--state", run])
        cli.main(["label", "train", "--state", run])
    capsys.readouterr()
    cli.main(["label", "status", "--state", run])
    status = json.loads(capsys.readouterr().out)
    assert status["labelled"] == 48 and sum(status["per_class"].values()) == 48
    assert [c["labelled"] for c in status["curve"]] == [24, 48] and len(status["agreement"]) == 1
    queried = [set(json.loads((Path(run) / "queries" / f"{k}.json").read_text())["ids"]) for k in range(2)]
    assert not queried[0] & queried[1]  # a labelled text is never queried again
    # a crash after a third round's import, before its training: a simulation rerun reports the trained
    # rounds without training them again and trains the third
    rounds = active.Rounds(Path(run))
    rounds.import_answers({it["id"]: gold[it["id"]] for it in rounds.query(24, "entropy")})
    again = active.simulate(rounds, gold, [24, 48, 72], "entropy")
    assert again[:2] == [{"labelled": c["labelled"], "accuracy": c["accuracy"], "f1": c["f1"], "seconds": None}
                         for c in status["curve"]]
    assert again[2]["labelled"] == 72 and again[2]["seconds"] > 0 and (Path(run) / "rounds" / "2" / "round.json").is_file()
