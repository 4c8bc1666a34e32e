"""Cloud workdirs on a local GCS emulator (started and stopped here): a run in gs:// writes everything to the
bucket and nothing locally, survives SIGKILL and SIGTERM (preemption) with exact resume, predicts from the
bucket; two jax.distributed processes run a pipeline in it as one process does, sharing one checkpoint and
resuming from it; a pipeline with every kind of stage runs with its folder in the bucket."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, overrides, xla_flags

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "test-bucket"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    port = free_port()
    # The emulator serves from one thread with a listen backlog of 5 (tensorstore's parallel uploads then wait
    # out TCP SYN retries for minutes) and rewrites its whole metadata file on every write (quadratic in the
    # objects; that file only matters to an on-disk store). A deep backlog and no metadata file fix both.
    start = ("import http.server, sys; http.server.HTTPServer.request_queue_size = 4096; "
             "from gcp_storage_emulator import storage; storage.Storage._write_config_to_file = lambda self: None; "
             "from gcp_storage_emulator.__main__ import main; main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", start, "start", "--host", "127.0.0.1", "--port", str(port),
                                "--in-memory", "--quiet", "--default-bucket", BUCKET],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield env
    process.terminate()
    process.wait(timeout=30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def objects(prefix: str) -> list[str]:
    """Object names under a prefix, straight from the emulator's JSON API (no client-side listing cache)."""
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o?prefix={urllib.parse.quote(prefix)}"
    with urllib.request.urlopen(url, timeout=120) as response:
        return [item["name"] for item in json.loads(response.read()).get("items", [])]


def read(name: str) -> str:
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read().decode()


def steps(prefix: str) -> list[int]:
    """Complete checkpoint steps: in a bucket orbax marks a finished step with <step>/commit_success.txt."""
    return sorted(int(n[len(prefix):].split("/")[0]) for n in objects(prefix)
                  if n[len(prefix):].split("/")[0].isdigit() and n.endswith(f"{n[len(prefix):].split('/')[0]}/commit_success.txt"))


def cli(args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "jaxopt_llm.cli", *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 **(env or {"XLA_FLAGS": xla_flags(1)})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, codes=(0,), timeout=300):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"{process.args[3:5]} did not finish in {timeout} s: {err[-3000:]}")
    assert process.returncode in codes, err[-3000:]
    return out, err


def exists(name: str) -> bool:
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"
    try:
        with urllib.request.urlopen(url, timeout=120):
            return True
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return False
        raise


def remove(name: str) -> None:
    url = f"{os.environ['STORAGE_EMULATOR_HOST']}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=120).close()


def pipeline_train(setup, **extra) -> dict:
    """A pipeline stage's training overrides: the tiny fine-tune's, less what the pipeline sets itself."""
    items = dict(item.split("=", 1) for item in overrides(setup, **extra))
    return {k: v for k, v in items.items() if not k.startswith(("model.", "data.train_file", "data.label_column"))}


def wait_for_checkpoint(prefix, step, process, timeout=400):
    """Until checkpoint `step` is complete (its commit_success.txt is written)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if exists(f"{prefix}{step}/commit_success.txt"):
            return
        time.sleep(1.0)
    pytest.fail(f"checkpoint {step} did not appear in time (process exit {process.poll()})")


def metrics(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_in_a_bucket_lands_there_survives_sigkill_and_sigterm_and_resumes_exactly(emulator, setup, tmp_path):
    # log_every 4 divides neither checkpoint (6, and 7 on SIGTERM): the log interval's running sums must travel
    # with the checkpoint for the first line logged after each resume to be the straight run's
    items = overrides(setup, **{"train.steps": 12, "train.log_every": 4, "train.eval_every": 6,
                                "train.checkpoint_every": 6, "train.learning_rate": 1e-4,
                                # the emulator has no batch delete, which gcsfs uses to drop old checkpoints
                                "train.keep_checkpoints": 5})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    straight = cli(["finetune", "--workdir", str(tmp_path / "straight"), *items], tmp_path)
    run = f"gs://{BUCKET}/run"
    first = cli(["finetune", "--workdir", run, *items], cwd)
    wait_for_checkpoint("run/checkpoints/", 6, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = cli(["finetune", "--workdir", run, *items], cwd)
    deadline = time.time() + 400

    def resumed():  # its record says it resumed: SIGTERM from here on stops it after its first step
        return len(json.loads(read("run/run.json")).get("history", [])) >= 2

    while time.time() < deadline and second.poll() is None and not resumed():
        time.sleep(0.2)
    second.send_signal(signal.SIGTERM)  # a preempted VM: finish the step, save it, exit 75
    _, err = finish(second, codes=(75,))
    step = int(err.split("checkpoint saved at step ")[1].split()[0])
    assert exists(f"run/checkpoints/{step}/commit_success.txt") and step == 7
    finish(cli(["finetune", "--workdir", run, *items], cwd))
    finish(straight)
    assert list(cwd.iterdir()) == []  # nothing under the current folder
    names = {n.split("/")[1] for n in objects("run/")}
    assert {"run.json", "labels.json", "metrics.jsonl", "checkpoints", "model", "tensorboard"} <= names
    assert "run/model/model.safetensors" in objects("run/model/") and objects("run/tensorboard/")
    record = json.loads(read("run/run.json"))
    assert [h["event"] for h in record["history"]] == ["start", "resume", "resume"]
    logged = metrics(read("run/metrics.jsonl"))
    assert [r["step"] for r in logged if r["split"] == "train"] == [4, 8, 12]
    assert logged == metrics((tmp_path / "straight" / "metrics.jsonl").read_text())  # every value bit-identical
    predicts = [cli(["predict", "classify", "--model", model, "good flight"], cwd)
                for model in (run, str(tmp_path / "straight"))]
    (out, _), (local, _) = map(finish, predicts)
    assert json.loads(out)["scores"] == pytest.approx(json.loads(local)["scores"], abs=1e-6)


PAIR = '''"""jaxopt-llm pipeline run {file} --workdir gs://test-bucket/two"""
from jaxopt_llm.pipeline import Pipeline, Split, Stage


def get_pipeline():
    return Pipeline(
        name="pair", data=Split(source={source!r}, label_column="sentiment", test_size=24, dev_size=16),
        examples=("I love this airline",), epsilon=0.01, pgd_steps=1, robust_examples=8, max_length=32, batch_size=8,
        stages=(
            Stage("finetune", "finetune", model={model!r}, overrides={train!r}),
            Stage("calibrated", "calibrate", model="@finetune"),
            Stage("deploy", "export", model="@calibrated"),
        ))
'''


def test_two_processes_run_a_pipeline_in_the_bucket_as_one_process_does_with_one_writer(emulator, setup, tmp_path):
    """jax.distributed on two local processes (a pod slice's hosts), the pipeline folder in the bucket: the
    training stage trains on both and shares one checkpoint there; process 0 alone splits, measures,
    calibrates, exports and reports. The results equal one process with the same two devices; an interrupted
    stage resumes on both from the bucket's checkpoint."""
    train = pipeline_train(setup, devices=None, **{"train.steps": 4, "train.log_every": 1, "train.checkpoint_every": 3})
    file = tmp_path / "pair.py"
    file.write_text(PAIR.format(file=file, source=str(setup / "tweets.csv"), model=str(setup / "model"), train=train))

    def pair():
        env = {"XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2"}
        return [cli(["pipeline", "run", str(file), "--workdir", f"gs://{BUCKET}/two"], tmp_path,
                    {**env, "JAX_PROCESS_ID": str(i)}) for i in range(2)]

    def run(process):
        out, err = finish(process, timeout=600)
        return json.loads(out.splitlines()[-1])["stages"], err

    single = cli(["pipeline", "run", str(file), "--workdir", str(tmp_path / "one")], tmp_path,
                 {"XLA_FLAGS": xla_flags(2)})
    (two, err0), (two1, err1), (one, _) = map(run, pair() + [single])
    assert "report:" in err0 and "report:" not in err1 and "[2/4]" not in err1  # one progress log, one report
    assert two == two1 and exists("two/report.html") and exists("two/model_card.md")
    name = {n: s["folder"].removeprefix(f"gs://{BUCKET}/") for n, s in two.items()}
    for stage, row in two.items():
        assert row["action"] == "run" and Path(row["folder"]).name == Path(one[stage]["folder"]).name  # same keys
        a = json.loads(read(f"{name[stage]}/done.json"))["metrics"]
        b = json.loads(Path(one[stage]["folder"], "done.json").read_text())["metrics"]
        for key in ("accuracy", "f1", "robust_accuracy", "train_examples", "temperature"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-4), (stage, key)
        assert a.get("nll") == pytest.approx(b.get("nll"), abs=1e-5), stage
    record = json.loads(read(f"{name['finetune']}/run.json"))
    assert record["process_count"] == 2 and record["device_count"] == 2
    losses = [[r["loss"] for r in metrics(text) if r["split"] == "train"]
              for text in (read(f"{name['finetune']}/metrics.jsonl"),
                           Path(one["finetune"]["folder"], "metrics.jsonl").read_text())]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-6, rel=0)
    assert steps(f"{name['finetune']}/checkpoints/") == [3, 4]
    # the stage interrupted between its checkpoints 3 and 4: both processes restore 3 from the bucket, go on
    for item in objects(f"{name['finetune']}/checkpoints/4/") + [f"{name['finetune']}/done.json"]:
        remove(item)
    again = [run(p)[0] for p in pair()]
    assert again[0] == again[1] and {n: r["action"] for n, r in again[0].items()} == {
        "data": "skip", "finetune": "resume", "calibrated": "skip", "deploy": "skip"}
    record = json.loads(read(f"{name['finetune']}/run.json"))
    assert record["resumed_from"] == 3 and record["process_count"] == 2
    resumed = [r for r in metrics(read(f"{name['finetune']}/metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx(losses[1], abs=1e-6, rel=0)
    a = json.loads(read(f"{name['finetune']}/done.json"))["metrics"]
    b = json.loads(Path(one["finetune"]["folder"], "done.json").read_text())["metrics"]
    assert a["accuracy"] == b["accuracy"] and a["nll"] == pytest.approx(b["nll"], abs=1e-5)


def test_a_scheme_without_its_client_is_one_clear_error():
    from jaxopt_llm import paths

    with pytest.raises(paths.PathError, match=r"s3:// paths need the package 's3fs'"):
        paths.Path("s3://bucket/run")


def test_the_launch_script_dry_run_prints_its_commands_and_refuses_a_local_workdir_on_a_pod():
    script = ROOT / "experiments" / "tpu" / "launch.sh"
    ok = subprocess.run(["bash", str(script), "--dry-run", "--workers", "4", "tpu", "zone", "finetune", "--workdir",
                         "gs://b/runs/x"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.count("\n+ ") + ok.stdout.startswith("+ ") == 3
    assert "JAXOPT_DISTRIBUTED=1 python -m jaxopt_llm.cli finetune --workdir gs://b/runs/x" in ok.stdout
    refused = subprocess.run(["bash", str(script), "--dry-run", "--workers", "4", "tpu", "zone", "finetune",
                              "--workdir", "runs/x"], capture_output=True, text=True)
    assert refused.returncode == 2 and "Use a bucket" in refused.stderr and refused.stdout == ""
    pipe = ["pipeline", "run", "experiments/pipelines/tweets_base.py"]
    ok = subprocess.run(["bash", str(script), "--dry-run", "--workers", "4", "tpu", "zone", *pipe, "--workdir",
                         "gs://b/p"], capture_output=True, text=True)
    assert ok.returncode == 0 and f"JAXOPT_DISTRIBUTED=1 python -m jaxopt_llm.cli {' '.join(pipe)} --workdir gs://b/p" in ok.stdout
    refused = subprocess.run(["bash", str(script), "--dry-run", "--workers", "4", "tpu", "zone", *pipe],
                             capture_output=True, text=True)  # its default folder, runs/tweets_base, is local
    assert refused.returncode == 2 and "Use a bucket" in refused.stderr and refused.stdout == ""



PIPELINE = '''"""jaxopt-llm pipeline run {file} --workdir gs://test-bucket/pipe"""
from jaxopt_llm.pipeline import Pipeline, Split, Stage

TRAIN = {train!r}


def get_pipeline():
    return Pipeline(
        name="kinds", data=Split(source={source!r}, label_column="sentiment", test_size=24, dev_size=16),
        examples=("I love this airline",), epsilon=0.01, pgd_steps=1, robust_examples=8, max_length=32,
        batch_size=8,
        stages=(
            Stage("mlm", "pretrain", model={model!r}, overrides={{**TRAIN, "train.steps": 2}}),
            Stage("cloze", "prompt", model="@mlm", overrides={{**TRAIN, "train.steps": 2}}),
            Stage("members", "ensemble", model={model!r}, overrides={{**TRAIN, "ensemble.members": 2}}),
            Stage("student", "distill", overrides={{**TRAIN, "distill.teacher": "@members",
                                                   "distill.student_layers": 1}}),
            Stage("rounds", "label", model={model!r}, budgets=(24,), overrides=TRAIN),
            Stage("calibrated", "calibrate", model="@student"),
            Stage("deploy", "export", model="@calibrated"),
        ))
'''


def test_every_kind_of_pipeline_stage_runs_in_a_bucket_is_measured_and_a_rerun_skips_it(emulator, setup, tmp_path,
                                                                                      monkeypatch):
    """pretrain, prompt, ensemble, distill, label rounds, calibrate and export, with the pipeline folder in the
    bucket: everything lands there, nothing locally, and a second run skips every stage."""
    from jaxopt_llm import pipeline

    train = pipeline_train(setup, **{"train.steps": 3, "train.checkpoint_every": 3})
    file = tmp_path / "kinds.py"
    file.write_text(PIPELINE.format(file=file, train=train, source=str(setup / "tweets.csv"), model=str(setup / "model")))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    spec = pipeline.load(file)
    rows = {r["name"]: r for r in pipeline.run(spec, f"gs://{BUCKET}/pipe")}
    assert list(cwd.iterdir()) == []  # nothing under the current folder
    names = objects("pipe/")
    folder = {n: str(r["folder"]).removeprefix(f"gs://{BUCKET}/") for n, r in rows.items()}
    for name, row in rows.items():
        assert row["action"] == "run" and f"{folder[name]}/done.json" in names, name
    assert {"pipe/report.html", "pipe/model_card.md", "pipe/pipeline.json"} <= set(names)
    assert f"{folder['deploy']}/artifact/manifest.json" in names
    assert f"{folder['rounds']}/rounds/rounds/0/model/model.safetensors" in names  # a label round's model
    metrics = {n: json.loads(read(f"{folder[n]}/done.json"))["metrics"] for n in rows}
    for name in ("cloze", "members", "student", "rounds", "calibrated", "deploy"):
        assert 0 <= metrics[name]["accuracy"] <= 1 and metrics[name]["test_examples"] == 24, name
    assert metrics["members"]["robust_accuracy"] is None and "ensemble of 2" in metrics["members"]["note"]
    assert metrics["cloze"]["robust_accuracy"] is None and "cloze prompt" in metrics["cloze"]["note"]
    assert metrics["student"]["robust_accuracy"] is not None and metrics["mlm"]["mlm_accuracy"] is not None
    record = json.loads(read(f"{folder['student']}/run.json"))
    assert record["config"]["distill"]["teacher"] == str(rows["members"]["folder"])
    assert [r["labelled"] for r in json.loads(read(f"{folder['rounds']}/rounds.json"))] == [24]
    assert metrics["rounds"]["model"].startswith(str(rows["rounds"]["folder"]))
    # the artifact served from the bucket predicts what the calibrated run in the bucket predicts
    for key in ("accuracy", "nll", "ece"):
        assert metrics["deploy"][key] == pytest.approx(metrics["calibrated"][key], abs=1e-4), key
    assert metrics["calibrated"]["temperature"] != 1.0
    # an export into the bucket keeps its format and quantization
    from jaxopt_llm.export import export
    from jaxopt_llm.serving.artifact import Artifact

    export(str(rows["calibrated"]["folder"]), f"gs://{BUCKET}/onnx", format="onnx", quantize="int8-dynamic",
           golden_texts=["I love this airline"])
    onnx_art = Artifact.load(f"gs://{BUCKET}/onnx", backend="onnxruntime")  # its own golden outputs, checked
    assert onnx_art.manifest["quantize"] == "int8-dynamic" and "onnx/model.onnx" in objects("onnx/")
    again = pipeline.run(spec, f"gs://{BUCKET}/pipe")
    assert {r["action"] for r in again} == {"skip"}
    assert [r["metrics"] for r in again] == [metrics[r["name"]] for r in again]
