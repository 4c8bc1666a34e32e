"""The multi-step pipeline end to end on a tiny random model: pretrain -> fine-tune -> adversarial -> calibrate
-> export, killed mid-stage and resumed, skipped when unchanged, rerun from a changed stage down; the report
checked in headless Chromium against metrics.json. The other stage kinds (prompt, ensemble, distill, label
rounds) run in tests/test_cloud.py, in a pipeline whose folder is a bucket."""

import dataclasses
import html.parser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import xla_flags

from jaxopt_llm import pipeline

ROOT = Path(__file__).resolve().parents[1]

PIPELINE = '''"""jaxopt-llm pipeline run {file}"""
from jaxopt_llm.pipeline import Pipeline, Split, Stage

TRAIN = {train!r}


def get_pipeline():
    return Pipeline(
        name="tiny", data=Split(source={source!r}, label_column="sentiment", test_size=24, dev_size=16),
        examples=("I love this airline", "worst flight ever, lost my bag"), epsilon=0.01, pgd_steps=2,
        robust_examples=16,
        max_length=32, batch_size=8,
        stages=(
            Stage("pretrain", "pretrain", model={model!r}, overrides={{**TRAIN, "train.steps": 2}}),
            Stage("finetune", "finetune", model="@pretrain", overrides={{**TRAIN, "train.steps": 8}}),
            Stage("robust", "adversarial", model="@finetune",
                  overrides={{**TRAIN, "train.steps": 2, "adversarial.epsilon": {epsilon}}}),
            Stage("calibrated", "calibrate", model="@robust"),
            Stage("deploy", "export", model="@calibrated"),
        ))
'''
TRAIN = {"parallel.devices": 1, "data.max_length": 32, "data.eval_fraction": 0.25, "train.batch_size": 8,
         "train.learning_rate": 1e-3, "train.warmup_steps": 0, "train.progress": False, "train.log_every": 2,
         "train.eval_every": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 5}


def write_pipeline(setup, file, epsilon=0.01):
    file.write_text(PIPELINE.format(file=file, train=TRAIN, source=str(setup / "tweets.csv"),
                                    model=str(setup / "model"), epsilon=epsilon))
    return file


@pytest.fixture(scope="module")
def ran(setup, tmp_path_factory):
    """A pipeline killed (SIGKILL) during its fine-tune stage, then run again to the end."""
    root = tmp_path_factory.mktemp("pipeline")
    file = write_pipeline(setup, root / "tiny.py")
    workdir = root / "work"
    process = subprocess.Popen([sys.executable, "-m", "jaxopt_llm.cli", "pipeline", "run", str(file), "--workdir",
                                str(workdir)], env={**os.environ, "PYTHONPATH": str(ROOT),
                                                    "XLA_FLAGS": xla_flags(1)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if any((f / "checkpoints" / "4").is_dir() for f in workdir.glob("finetune-*")):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate()
    assert "finetune" in err and not list(workdir.glob("finetune-*/done.json")), err[-2000:]
    rows = pipeline.run(pipeline.load(file), workdir)
    return {"file": file, "workdir": workdir, "rows": {r["name"]: r for r in rows}}


def test_a_killed_stage_resumes_and_the_finished_ones_are_skipped(ran):
    actions = {name: r["action"] for name, r in ran["rows"].items()}
    assert actions == {"data": "skip", "pretrain": "skip", "finetune": "resume", "robust": "run",
                       "calibrated": "run", "deploy": "run"}
    record = json.loads((ran["rows"]["finetune"]["folder"] / "run.json").read_text())
    assert record["resumed_from"] >= 4 and [h["event"] for h in record["history"]] == ["start", "resume"]
    for r in ran["rows"].values():
        assert json.loads((r["folder"] / "done.json").read_text())["key"] == r["key"]


def test_every_stage_predicts_on_the_same_test_set(ran, setup):
    test = (ran["rows"]["data"]["folder"] / "test.csv").read_text().splitlines()[1:]
    assert len(test) == 24
    names = json.loads((ran["rows"]["data"]["folder"] / "labels.json").read_text())
    for name in ("finetune", "robust", "calibrated", "deploy"):
        folder = ran["rows"][name]["folder"]
        m = json.loads((folder / "metrics.json").read_text())
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 24 and [r["label"] for r in rows] == [line.rsplit(",", 1)[1] for line in test]
        probs = np.asarray([r["scores"] for r in rows])
        labels = np.asarray([names.index(r["label"]) for r in rows])
        assert m["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-9)
        nll = -np.mean(np.log(probs[np.arange(24), labels]))
        assert m["nll"] == pytest.approx(nll, abs=1e-4)
        assert m["parameters"] > 0 and m["latency_ms"] > 0 and len(m["examples"]) == 2
    robust = json.loads((ran["rows"]["robust"]["folder"] / "metrics.json").read_text())
    rows = [json.loads(x) for x in (ran["rows"]["robust"]["folder"] / "predictions.jsonl").read_text().splitlines()]
    clean_16 = np.mean([r["predicted"] == r["label"] for r in rows[:16]])  # the attacked texts, unattacked
    assert robust["robust_examples"] == 16 and 0 <= robust["robust_accuracy"] <= clean_16 + 1e-6
    # the artifact serves what the calibrated run predicts (temperature included)
    calibrated = [json.loads(x)["scores"] for x in (ran["rows"]["calibrated"]["folder"] / "predictions.jsonl")
                  .read_text().splitlines()]
    deployed = [json.loads(x)["scores"] for x in (ran["rows"]["deploy"]["folder"] / "predictions.jsonl")
                .read_text().splitlines()]
    assert np.allclose(calibrated, deployed, atol=1e-4)
    temperature = json.loads((ran["rows"]["calibrated"]["folder"] / "temperature.json").read_text())
    assert temperature["after"]["nll"] <= temperature["before"]["nll"] + 1e-6
    pretrain = json.loads((ran["rows"]["pretrain"]["folder"] / "metrics.json").read_text())
    assert pretrain["mlm_accuracy"] is not None and "[MASK]" in pretrain["examples"][0]["text"]


def test_an_unchanged_pipeline_is_skipped_and_a_changed_stage_reruns_with_its_descendants(ran, setup):
    again = pipeline.run(pipeline.load(ran["file"]), ran["workdir"])
    assert {r["action"] for r in again} == {"skip"}
    changed = write_pipeline(setup, ran["file"].with_name("changed.py"), epsilon=0.02)
    rows = {r["name"]: r for r in pipeline.plan(pipeline.load(changed), ran["workdir"])}
    assert {n: r["action"] for n, r in rows.items()} == {"data": "skip", "pretrain": "skip", "finetune": "skip",
                                                        "robust": "run", "calibrated": "run", "deploy": "run"}
    assert rows["robust"]["why"] == "changed: overrides.adversarial.epsilon"
    assert rows["finetune"]["folder"] == ran["rows"]["finetune"]["folder"]
    assert rows["robust"]["folder"] != ran["rows"]["robust"]["folder"]
    forced = {r["name"]: r["action"] for r in pipeline.plan(pipeline.load(ran["file"]), ran["workdir"],
                                                             force=("finetune",))}
    assert forced == {"data": "skip", "pretrain": "skip", "finetune": "rerun", "robust": "rerun",
                      "calibrated": "rerun", "deploy": "rerun"}
    out = subprocess.run([sys.executable, "-m", "jaxopt_llm.cli", "pipeline", "run", str(changed), "--workdir",
                          str(ran["workdir"]), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "(changed: overrides.adversarial.epsilon)" in out.stderr
    assert not rows["robust"]["folder"].exists()  # a dry run runs nothing


@pytest.mark.parametrize("stages, message", [
    ('(Stage("a", "finetune", model="@nope"),)', "names '@nope', which is not a stage"),
    ('(Stage("a", "finetune", model="@b"), Stage("b", "finetune", model="@a"))', "in a cycle"),
    ('(Stage("a", "polish"),)', "kind 'polish' is unknown"),
])
def test_a_bad_pipeline_is_one_clear_error_before_anything_runs(tmp_path, stages, message):
    file = tmp_path / "bad.py"
    file.write_text(f"from jaxopt_llm.pipeline import Pipeline, Stage\n\ndef get_pipeline():\n"
                    f"    return Pipeline(stages={stages})\n")
    out = subprocess.run([sys.executable, "-m", "jaxopt_llm.cli", "pipeline", "run", str(file), "--workdir",
                          str(tmp_path / "work")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "work").exists()


def test_label_rounds_under_several_processes_are_refused_before_anything_runs(setup, tmp_path, monkeypatch):
    import jax

    file = write_pipeline(setup, tmp_path / "tiny.py")
    spec = pipeline.load(file)
    spec = dataclasses.replace(spec, stages=spec.stages + (pipeline.Stage("rounds", "label", model="@finetune",
                                                                          budgets=(8,)),))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(pipeline.PipelineError, match=r"stage 'rounds' \(label rounds\) runs on one process.*--only rounds"):
        pipeline.run(spec, tmp_path / "work")
    assert not (tmp_path / "work").exists()


class _Cells(html.parser.HTMLParser):
    """The stage table's cells: {stage: {metric: text}}."""

    def __init__(self):
        super().__init__()
        self.cells, self.stage, self.metric = {}, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-stage" in attrs:
            self.stage = attrs["data-stage"]
            self.cells[self.stage] = {}
        if tag == "td" and "data-metric" in attrs:
            self.metric = attrs["data-metric"]

    def handle_data(self, data):
        if self.metric:
            self.cells[self.stage][self.metric] = data.strip()
            self.metric = None


def test_the_report_opens_in_headless_chromium_without_errors_and_shows_metrics_json(ran):
    from jaxopt_llm.pipeline.report import cell, columns

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed (apt-get install -y chromium; `make test` installs it)"
    report = ran["workdir"] / "report.html"
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    console = [line for line in out.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == [] and "<table" in out.stdout
    parser = _Cells()
    parser.feed(out.stdout)
    stages = [n for n in ran["rows"] if n != "data"]
    assert sorted(parser.cells) == sorted(stages)
    done = {n: json.loads((ran["rows"][n]["folder"] / "done.json").read_text())["metrics"] for n in stages}
    shown = columns([{"metrics": m} for m in done.values()])
    assert "entity_f1" not in [k for k, _, _ in shown]  # a classification pipeline shows its own columns
    for name in stages:
        for key, _, digits in shown:
            assert parser.cells[name][key] == cell(done[name].get(key), digits), (name, key)
    card = (ran["workdir"] / "model_card.md").read_text()
    final = json.loads((ran["rows"]["deploy"]["folder"] / "metrics.json").read_text())
    assert card.startswith("---\n") and "model-index:" in card and f"value: {final['accuracy']:.4f}" in card

