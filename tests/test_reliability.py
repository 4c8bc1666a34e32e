"""Nothing silently wrong: each defect found by a bad-input probe, then each class behind
them as a table — errors for people (one message, exit code 2, no traceback) and nothing half-written."""

import json
import math
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import overrides, records

from jaxopt_llm import cli, optim, runs
from jaxopt_llm import config as config_lib
from jaxopt_llm.config import DataConfig, TrainConfig
from jaxopt_llm.data.sources import read_rows
from jaxopt_llm.errors import UserError
from jaxopt_llm.models import bert
from jaxopt_llm.train import MetricsLog, read_metrics, train


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished 4-step fine-tune run folder (checkpoints at steps 2 and 4)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(config_lib.load(None, overrides(setup, **{"train.steps": 4, "train.checkpoint_every": 2,
                                                    "train.keep_checkpoints": 3})), workdir)
    return workdir


def cli_error(capsys, argv):
    """Run the CLI expecting one clear error: exit code 2, one `error:` line, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- defects ------------------------------------------------------------------------------------------


def test_1_a_folder_without_its_tokenizer_is_refused_and_save_pretrained_writes_it(finished, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(finished / "model" / name, bare)
    message = cli_error(capsys, ["predict", "classify", "--model", bare, "hello"])
    assert "has no tokenizer" in message
    # a tokenizer that does not fit the model (a 5-token vocabulary) is refused too
    (bare / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    assert "does not fit the model: 5 tokens" in cli_error(capsys, ["predict", "classify", "--model", bare, "hi"])
    # the README's save: a model loaded from a folder with a tokenizer carries it along
    model = bert.from_pretrained(finished, "sequence-classification")
    bert.save_pretrained(model, tmp_path / "out")
    assert (tmp_path / "out" / "vocab.txt").is_file() or (tmp_path / "out" / "tokenizer.json").is_file()
    capsys.readouterr()
    cli.main(["predict", "classify", "--model", str(tmp_path / "out"), "good morning"])
    assert json.loads(capsys.readouterr().out)["label"] in ("negative", "neutral", "positive")


def test_2_resuming_with_changed_settings_is_refused_and_extending_is_recorded(setup, tmp_path):
    items = overrides(setup, **{"train.steps": 4, "train.checkpoint_every": 2})
    train(config_lib.load(None, items), tmp_path)
    original = json.loads((tmp_path / "run.json").read_text())
    for change, key in (("train.learning_rate=0.01", "train.learning_rate"), ("train.batch_size=16",
                        "train.batch_size"), (f"model.name_or_path={tmp_path}", "model.name_or_path")):
        with pytest.raises(config_lib.ConfigError, match=rf"{key}: .* -> .*new --workdir"):
            train(config_lib.load(None, [*items, change]), tmp_path)
    assert json.loads((tmp_path / "run.json").read_text()) == original  # nothing rewritten
    train(config_lib.load(None, [*items, "train.steps=6"]), tmp_path)  # extending is a resumable change
    record = json.loads((tmp_path / "run.json").read_text())
    assert [h["event"] for h in record["history"]] == ["start", "resume"]
    assert record["history"][0]["config"] == original["config"]  # the original record is kept
    assert record["history"][1]["changes"] == {"train.steps": [4, 6]} and record["history"][1]["step"] == 4
    assert [r["step"] for r in records(tmp_path, "train")] == [2, 4, 6]


def test_3_a_corrupt_latest_checkpoint_falls_back_to_an_older_one(finished, tmp_path, setup, capsys):
    items = overrides(setup, **{"train.steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 3})
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "model")  # as if the run died after its last checkpoint
    for file in (run / "checkpoints" / "4").rglob("*"):
        if file.is_file() and file.stat().st_size > 0 and "state" in file.parts:
            file.write_bytes(b"garbage")
    capsys.readouterr()
    train(config_lib.load(None, items), run)
    err = capsys.readouterr().err
    assert "step 4" in err and "does not restore" in err and "resuming from step 2" in err
    assert json.loads((run / "run.json").read_text())["resumed_from"] == 2
    assert records(run, "train") == records(finished, "train")  # and the rerun is exact
    for file in (run / "checkpoints").rglob("*"):
        if file.is_file() and "state" in file.parts and file.stat().st_size > 0:
            file.write_bytes(b"garbage")
    shutil.rmtree(run / "model")
    with pytest.raises(ValueError, match=r"no checkpoint in .* restores.*Delete that folder"):
        train(config_lib.load(None, items), run)


def test_4_a_csv_field_over_128_kb_loads(tmp_path):
    file = tmp_path / "long.csv"
    file.write_text("text,label\n" + '"' + "word " * 40_000 + '",pos\nshort,neg\n')
    texts, _, labels, _ = read_rows(DataConfig(train_file=str(file)), "train", "label")
    assert len(texts[0]) == 200_000 and labels == ["pos", "neg"]


def test_5_nan_and_null_texts_are_dropped_and_counted(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text('{"text": NaN, "label": "a"}\n{"text": null, "label": "a"}\n{"text": "ok", "label": "b"}\n'
                    '{"text": "nan", "label": "a"}\n')
    texts, _, labels, report = read_rows(DataConfig(train_file=str(file)), "train", "label")
    assert texts == ["ok", "nan"] and report.empty_text == 2  # the word "nan" is a text; NaN is not


def test_6_bad_learning_rates_are_refused_and_a_nan_rate_is_skipped():
    for value in ("nan", "-1e-4", "inf", "0"):
        with pytest.raises(config_lib.ConfigError, match=r"train.learning_rate="):
            config_lib.load(None, ["data.train_file=x.csv", f"train.learning_rate={value}"])
    tx = optim.make(TrainConfig(learning_rate=math.nan, steps=10))  # bypassing validation: finite gradients
    params = {"w": jnp.ones(3)}
    updates, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["w"], np.ones(3))
    assert int(optim.skipped_updates(state)) == 1


def test_7_nan_epsilon_is_refused_and_nonfinite_metrics_are_logged_as_null(tmp_path):
    for item in ("adversarial.epsilon=nan", "adversarial.epsilon=inf", "adversarial.inner_lr=nan"):
        with pytest.raises(config_lib.ConfigError, match=item.split("=")[0]):
            config_lib.load(None, ["data.train_file=x.csv", "method=adversarial", item])
    log = MetricsLog(runs.RunFolder(tmp_path), None, True)
    log.write(1, "train", {"loss": math.nan, "kl": -math.inf, "accuracy": 0.5})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "split": "train", "loss": None, "kl": None, "accuracy": 0.5}
    assert "NaN" not in line and "Infinity" not in line


@pytest.mark.parametrize("grid", ["eps=-0.01,0.1", "eps=nan", "eps=0,inf"])
def test_8_sweep_refuses_negative_and_nonfinite_epsilons(finished, setup, capsys, grid):
    message = cli_error(capsys, ["sweep", "robustness", "--model", finished, "--data", setup / "tweets.csv", grid])
    assert "finite number >= 0" in message


# defect 9 (the first line logged after a SIGKILL resume) is test_train.py::test_sigkill_resume_is_bit_identical,
# now with a checkpoint inside a log interval.


# ---- class: errors for people ------------------------------------------------------------------------


def _bad_safetensors(folder):
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])


class Payload:
    """Not a tensor: what a malicious pickle would carry."""


def _pickle(folder):
    import torch

    (folder / "model.safetensors").unlink()
    torch.save({"weights": Payload()}, folder / "pytorch_model.bin")


T = "{train}"  # the tiny fine-tune's overrides; later items replace them
ERRORS = [  # (what, the input made in tmp_path, argv, message)
    ("config syntax error", "config.py:def get_config(:\n", ["finetune", "--config", "{file}", "--workdir",
     "{tmp}/r", T], r"failed at line 1: SyntaxError"),
    ("config import error", "config.py:import no_such_module\n", ["finetune", "--config", "{file}", "--workdir",
     "{tmp}/r", T], r"failed at line 1: ModuleNotFoundError"),
    ("get_config of the wrong type", "config.py:def get_config():\n    return {'task': 'x'}\n",
     ["finetune", "--config", "{file}", "--workdir", "{tmp}/r", T], r"returned dict, not a jaxopt_llm.config.Config"),
    ("broken JSONL line", 'data.jsonl:{"text": "a", "sentiment": "x"}\n\n{"text": "b", "sentiment\n',
     ["finetune", "--workdir", "{tmp}/r", T, "data.train_file={file}"], r"line 3 is not valid JSON"),
    ("integer labels out of range", "data.csv:text,sentiment\n" + "".join(f"t{i},{1 + i % 3}\n" for i in range(40)),
     ["finetune", "--workdir", "{tmp}/r", T, "data.train_file={file}"], r"data.labels_as_names=true"),
    ("max_length above the positions", None, ["finetune", "--workdir", "{tmp}/r", T, "data.max_length=100"],
     r"data.max_length=100 is more than the model's 64 positions"),
    ("mistyped local path", None, ["predict", "classify", "--model", "{tmp}/runz/x", "hi"], r"does not exist"),
    ("mistyped relative path like a hub id", None, ["predict", "classify", "--model", "tests/no_such_run", "hi"],
     r"'tests/no_such_run' does not exist \('tests' holds"),
    ("truncated safetensors", "model:truncate", ["predict", "classify", "--model", "{tmp}/model", "hi"],
     r"model.safetensors' is not a readable safetensors file"),
    ("blocked pickle", "model:pickle", ["predict", "classify", "--model", "{tmp}/model", "hi"],
     r"pytorch_model.bin' was refused: it holds objects other than tensors"),
    ("pretrain on a finetune workdir", None, ["pretrain", "--workdir", "{finished}", T,
     "data.train_file={setup}/lines.txt"], r"holds a classification / clean run.*task: 'classification' -> 'masked-lm'"),
    ("predict with an untrained head", None, ["predict", "classify", "--model", "{setup}/model", "hi"],
     r"has no trained classifier head weights.*--allow-untrained-head"),
    # every numeric option: out of range or non-finite is one error naming it
    ("sweep batch size 0", None, ["sweep", "eval", "--model", "{finished}", "--data", "{setup}/tweets.csv",
                                  "--batch-size", "0", "data.label_column=sentiment"], r"--batch-size 0: must be"),
    ("sweep negative chunk", None, ["sweep", "eval", "--model", "{finished}", "--data", "{setup}/tweets.csv",
                                    "--chunk", "-3", "data.label_column=sentiment"], r"--chunk -3: must be"),
    ("predict batch size 0", None, ["predict", "classify", "--model", "{finished}", "--batch-size", "0", "hi"],
     r"--batch-size 0: must be a finite number at least 1"),
    ("predict max-length 0", None, ["predict", "classify", "--model", "{finished}", "--max-length", "0", "hi"],
     r"--max-length 0: must be"),
    ("serve port out of range", None, ["serve", "{tmp}/none", "--port", "70000"], r"--port 70000: must be a finite "
     r"number from 1 to 65535"),
    ("serve nan wait", None, ["serve", "{tmp}/none", "--max-wait-ms", "nan"], r"--max-wait-ms nan: must be"),
    ("serve bad host", None, ["serve", "{tmp}/none", "--host", "no such host..x"], r"--host 'no such host..x'"),
    ("monitor negative window", None, ["monitor", "{tmp}/none", "--log", "{tmp}/log.jsonl", "--window", "-5"],
     r"--window -5: must be"),
    ("label query n 0", None, ["label", "query", "--state", "{tmp}/al", "--n", "0", "--out", "{tmp}/q.csv"],
     r"--n 0: must be"),
    ("pipeline workdir is a file", "pipe.py:from jaxopt_llm.pipeline import Pipeline, Stage\n\ndef get_pipeline():\n"
     "    return Pipeline(stages=(Stage('f', 'finetune', model='x'),))\n",
     ["pipeline", "run", "{file}", "--workdir", "{file}"], r"--workdir .* is a file"),
    ("pipeline without stages", "pipe.py:from jaxopt_llm.pipeline import Pipeline\n\ndef get_pipeline():\n"
     "    return Pipeline(stages=())\n", ["pipeline", "run", "{file}", "--workdir", "{tmp}/r"], r"has no stages"),
]


@pytest.mark.parametrize("what, make, argv, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_for_people(what, make, argv, message, setup, finished, tmp_path, capsys):
    name, _, text = (make or "").partition(":")
    if name == "model":
        shutil.copytree(finished / "model", tmp_path / "model")
        (_bad_safetensors if text == "truncate" else _pickle)(tmp_path / "model")
    elif name:
        (tmp_path / name).write_text(text)
    values = {"file": tmp_path / name, "tmp": tmp_path, "finished": finished, "setup": setup}
    full = []
    for item in argv:
        full += overrides(setup) if item == T else [item.format(**values)]
    assert re.search(message, cli_error(capsys, full)), what
    assert not (tmp_path / "r").exists()  # nothing written


def test_a_csv_with_a_byte_order_mark_loads(tmp_path):
    file = tmp_path / "bom.csv"
    file.write_bytes("\ufefftext,label\nhello,pos\n".encode("utf-8"))
    texts, _, labels, _ = read_rows(DataConfig(train_file=str(file)), "train", "label")
    assert texts == ["hello"] and labels == ["pos"]


# ---- class: nothing half-written ------------------------------------------------------------------------


def test_save_pretrained_replaces_the_folder_as_a_whole(finished, tmp_path, monkeypatch):
    out = tmp_path / "out"
    model = bert.from_pretrained(finished, "sequence-classification")
    bert.save_pretrained(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bert.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old folder, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(bert.CheckpointError, match="not a model folder"):
        bert.save_pretrained(model, tmp_path / "other")


def test_json_records_are_written_atomically(tmp_path, monkeypatch):
    file = tmp_path / "run.json"
    runs.write_json(file, {"a": 1})

    def crash(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        runs.write_json(file, {"a": 2})
    assert json.loads(file.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["run.json"]
    with pytest.raises(ValueError):
        runs.write_json(tmp_path / "nan.json", {"x": math.nan})  # never a file JSON readers reject


def test_a_line_cut_off_by_a_crash_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "split": "train", "loss": 1.0}]


def test_rerunning_a_finished_run_says_so_and_rewrites_nothing(finished, setup, capsys):
    record = (finished / "run.json").read_bytes()
    metrics = (finished / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    cli.main(["finetune", "--workdir", str(finished),
              *overrides(setup, **{"train.steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 3})])
    out, err = capsys.readouterr()
    assert "already finished at step 4" in err
    assert json.loads(out)["eval"] == {k: v for k, v in records(finished, "eval")[-1].items()
                                       if k not in ("step", "split")} != {}
    assert (finished / "run.json").read_bytes() == record and (finished / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("line, message", [
    ('{"probabilities": [NaN, 0.5, 0.5], "cls": [0.1, 0.2]}', r"log.jsonl:2: probabilities or cls hold NaN"),
    ('[1, 2, 3]', r"log.jsonl:2: a record must be an object with probabilities and cls"),
    ('{"probabilities": [0.2, 0.8], "cls": [0.1, 0.2]}', r"log.jsonl:2: 2 probabilities .* the artifact has 3 labels"),
    ('{"cls": [0.1, 0.2]}', r"log.jsonl:2: a record must be an object"),
    ('{"probabilities": "abc", "cls": [0.1]}', r"log.jsonl:2: probabilities and cls must be lists of numbers"),
])
def test_a_bad_monitor_log_record_names_its_line(tmp_path, line, message):
    from types import SimpleNamespace

    from jaxopt_llm.errors import UserError
    from jaxopt_llm.serving.report import monitor_report

    good = '{"probabilities": [0.2, 0.3, 0.5], "cls": [0.1, 0.2]}'
    (tmp_path / "log.jsonl").write_text(good + "\n" + line + "\n")
    artifact = SimpleNamespace(labels=["a", "b", "c"], reference={"confidence": [0.5], "class_distribution": [1, 0, 0],
                                                                  "examples": 1}, reference_cls=None, path=tmp_path)
    with pytest.raises(UserError, match=message):
        monitor_report(artifact, str(tmp_path / "log.jsonl"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_calibrate_and_stack_leave_the_folder_as_it_was_when_they_fail(finished, setup, tmp_path, monkeypatch):
    """A failure injected after every check: calibrate writes no temperature and no plot; stack no folder."""
    from jaxopt_llm import calibration, commands, inference

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = sorted(p.name for p in run.iterdir())
    model = inference.load(run)
    texts, labels = ["good", "bad", "fine", "awful"], np.array([2, 0, 1, 0])
    assert model.kind == "classifier"
    with pytest.raises(UserError, match="--plot .*its folder does not exist"):
        commands.calibrate_run(str(run), texts, labels, str(tmp_path / "no" / "plot.png"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(calibration, "reliability_diagram", broken)
    with pytest.raises(OSError, match="disk full"):
        commands.calibrate_run(str(run), texts, labels, str(run / "reliability.png"))
    assert sorted(p.name for p in run.iterdir()) == before  # no temperature.json
    monkeypatch.undo()
    monkeypatch.setattr(runs.RunFolder, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        commands.calibrate_run(str(run), texts, labels, str(run / "reliability.png"))
    assert sorted(p.name for p in run.iterdir()) == before  # and the plot drawn first is gone with it
    monkeypatch.undo()
    record = commands.calibrate_run(str(run), texts, labels, str(run / "reliability.png"))
    assert (run / "temperature.json").is_file() and (run / "reliability.png").is_file() and record["temperature"] > 0
    calls = []

    def copy_then_fail(src, dst, *args, **kwargs):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return shutil.copytree.__wrapped__(src, dst, *args, **kwargs) if hasattr(shutil.copytree, "__wrapped__") \
            else original(src, dst, *args, **kwargs)

    original = shutil.copytree
    monkeypatch.setattr(shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        commands.stack_runs([str(finished), str(run)], str(tmp_path / "ens"))
    monkeypatch.undo()
    assert not (tmp_path / "ens").exists() and not list(tmp_path.glob(".ens*"))


def test_label_import_interrupted_before_closing_its_round_closes_it_when_run_again(setup, tmp_path, monkeypatch):
    from jaxopt_llm import active

    pool = tmp_path / "pool.csv"
    pool.write_text("id,text\n" + "".join(f"p{i},text number {i}\n" for i in range(20)))
    rounds = active.Rounds.init(tmp_path / "al", str(pool), ["neg", "pos"], None, None, "random")
    items = rounds.query(3)
    answers = {it["id"]: "neg" for it in items}
    real = active.write_json

    def crash(file, value, *args, **kwargs):
        if str(file).endswith(".done"):
            raise KeyboardInterrupt
        return real(file, value, *args, **kwargs)

    monkeypatch.setattr(active, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        rounds.import_answers(answers)
    monkeypatch.undo()
    assert rounds.round() == 0 and len(rounds.labelled()) == 3  # labels in, round still open
    result = rounds.import_answers(answers)  # the same command again
    assert rounds.round() == 1 and result["labelled"] == 3


def test_sigint_is_one_line_exit_130_with_the_step_in_flight_checkpointed(setup, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import xla_flags

    root = Path(__file__).resolve().parents[1]
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "jaxopt_llm.cli", "finetune", "--workdir", str(workdir),
            *overrides(setup, **{"train.steps": 400, "train.checkpoint_every": 2, "train.eval_every": 1000})]
    env = {**os.environ, "PYTHONPATH": str(root), "XLA_FLAGS": xla_flags(1)}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not (workdir / "checkpoints" / "2").is_dir():
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume"
    assert not list(workdir.rglob("*.tmp*"))  # nothing half-written
    from jaxopt_llm import checkpoint

    assert checkpoint.has_steps(workdir / "checkpoints")  # the same command resumes from here


def test_a_report_that_fails_to_render_leaves_the_last_one_as_it_was(tmp_path, monkeypatch):
    from jaxopt_llm.pipeline import Pipeline
    from jaxopt_llm.pipeline import report as report_lib

    data = {"test_examples": 2, "source": "tweets.csv", "majority_class_accuracy": 0.5, "labels": ["a", "b"]}
    rows = [{"name": "data", "kind": "split", "metrics": data, "folder": tmp_path / "data-1"},
            {"name": "finetune", "kind": "finetune", "metrics": {"accuracy": 0.5, "model": "m", "note": None},
             "folder": tmp_path / "finetune-1"}]
    pipeline = Pipeline(stages=(), name="p")
    report_lib.write(pipeline, tmp_path, rows)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rows[1]["metrics"]["accuracy"] = 0.75

    def broken(*args, **kwargs):
        raise RuntimeError("card failed")

    monkeypatch.setattr(report_lib, "model_card", broken)  # after the page is rendered, before anything is written
    with pytest.raises(RuntimeError, match="card failed"):
        report_lib.write(pipeline, tmp_path, rows)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
