"""Deployment: the exported functions against in-process prediction (every bucket, batch 1, 3 and 32), an
artifact loading in a process without flax / transformers / torch, tampering, the HTTP server with
concurrent clients and malformed requests, and the drift statistics against scipy."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import free_port, overrides
from flax import nnx

from jaxopt_llm import cli, inference
from jaxopt_llm import config as config_lib
from jaxopt_llm.errors import UserError
from jaxopt_llm.models import bert
from jaxopt_llm.serving import drift
from jaxopt_llm.serving.artifact import Artifact, ArtifactError
from jaxopt_llm.train import train

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["love this airline", "worst flight ever, lost my bag", "it is a plane", "ok", "thanks!"]


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    train(config_lib.load(None, overrides(setup, **{"train.steps": 2})), root / "run")
    golden = root / "golden.txt"
    golden.write_text("\n".join(TEXTS))
    cli.main(["export", str(root / "run"), "--out", str(root / "art"), "--platforms", "cpu,cuda,tpu",
              "--buckets", "16,32", "--data", str(setup / "tweets.csv"), "--golden", str(golden),
              "data.label_column=sentiment", "data.max_length=32"])
    return root


def test_every_bucket_equals_in_process_prediction_at_batch_1_3_32(exported):
    art = Artifact.load(exported / "art")
    model = bert.from_pretrained(exported / "run", "sequence-classification")
    graphdef, state = nnx.split(model)

    @jax.jit
    def ours(ids, mask, types):
        m = nnx.merge(graphdef, state)
        return jax.nn.softmax(m(ids, attention_mask=mask, token_type_ids=types), -1)

    rng = np.random.default_rng(0)
    for t in art.buckets:
        for b in (1, 3, 32):
            lengths = rng.integers(3, t + 1, b)
            ids = rng.integers(1000, 30000, (b, t)).astype(np.int32)
            mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
            ids[mask == 0] = 0
            types = np.zeros_like(ids)
            probs, cls = art.functions[t].call(art.weights, ids, mask, types)
            np.testing.assert_allclose(np.asarray(probs), np.asarray(ours(ids, mask, types)), atol=1e-5)
            assert np.asarray(cls).shape == (b, model.config.hidden_size)
    manifest = json.loads((exported / "art" / "manifest.json").read_text())
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"] and manifest["labels"] == ["negative", "neutral", "positive"]
    assert (exported / "art" / "hf" / "model.safetensors").is_file()  # the HF export beside it
    expected = [r["scores"] for r in inference.load(exported / "run").classify(TEXTS)]
    np.testing.assert_allclose(art.predict(TEXTS)[0], expected, atol=1e-5)  # texts in, same as predict


def test_an_artifact_loads_without_flax_transformers_or_torch(exported):
    code = ("import sys, json; from jaxopt_llm.serving.artifact import Artifact; a = Artifact.load(sys.argv[1]); "
            "out = a.classify(['love this airline'], top_k=3); "
            "bad = [m for m in ('flax', 'transformers', 'torch', 'optax') if m in sys.modules]; "
            "print(json.dumps({'out': out, 'bad': bad}))")
    done = subprocess.run([sys.executable, "-c", code, str(exported / "art")], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bad"] == [] and len(result["out"][0]) == 3
    assert sum(r["score"] for r in result["out"][0]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("tamper, message", [("change", "has changed"), ("remove", "is missing")])
def test_a_changed_or_missing_file_is_one_clear_error(exported, tmp_path, tamper, message):
    art = tmp_path / "art"
    shutil.copytree(exported / "art", art)
    if tamper == "change":
        (art / "golden.json").write_text((art / "golden.json").read_text().replace("0.", "0.9", 1))
    else:
        (art / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match=rf"(golden.json|tokenizer.json) {message}"):
        Artifact.load(art)


def call(port, path, body=None, raw=None, method=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def start_server(artifact, *options):
    """(the serve process, its port) once it answers /v2/health/ready."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "jaxopt_llm.cli", "serve", str(artifact), "--port", str(port),
                                *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if call(port, "/v2/health/ready")[0] == 200:
                return process, port
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    process.kill()
    pytest.fail(process.stderr.read()[-2000:])


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    process, port = start_server(exported / "art", "--max-texts", "8", "--max-chars", "200", "--max-body", "4000",
                                 "--log", str(log), "--body-seconds", "1")
    yield port, log
    process.terminate()  # graceful shutdown: uvicorn finishes, then re-raises SIGTERM as its exit status
    process.wait(timeout=60)
    assert "stopped after" in process.stderr.read()


def test_concurrent_clients_get_in_process_answers(server, exported):
    port, _ = server
    art = Artifact.load(exported / "art")
    texts = [f"{t} #{i}" for i in range(6) for t in TEXTS]
    expected = art.predict(texts)[0]
    results = [None] * len(texts)

    def client(i):
        status, body = call(port, "/predict", {"inputs": texts[i], "parameters": {"top_k": 3}})
        results[i] = (status, json.loads(body))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (status, rows), probs in zip(results, expected):
        assert status == 200
        got = {r["label"]: r["score"] for r in rows}
        want = dict(zip(["negative", "neutral", "positive"], probs))
        assert got == pytest.approx(want, abs=1e-5) and [r["score"] for r in rows] == sorted(got.values(), reverse=True)
    status, body = call(port, "/predict", {"inputs": TEXTS[:2]})
    assert status == 200 and [len(r) for r in json.loads(body)] == [1, 1]  # a list in, one list per text out
    status, body = call(port, f"/v2/models/{art.name}/infer",
                        {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]})
    outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert status == 200 and outputs["probabilities"]["shape"] == [2, 3]
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (2, 3)), art.predict(TEXTS[:2])[0],
                               atol=1e-5)
    status, body = call(port, f"/v2/models/{art.name}")
    assert call(port, "/v2/health/live")[0] == 200 and status == 200 and json.loads(body)["platform"] == "jax"


BAD = [
    ("/predict", None, b"{not json", 400, "not valid JSON"),
    ("/predict", [1, 2], None, 422, "JSON object"),
    ("/predict", {"inputs": 5}, None, 422, "string or a list of strings"),
    ("/predict", {"inputs": []}, None, 422, "empty"),
    ("/predict", {"inputs": ""}, None, 422, "empty"),
    ("/predict", {"inputs": ["a"] * 9}, None, 413, "9 texts in one request; the limit is 8"),
    ("/predict", {"inputs": "x" * 201}, None, 413, "longer than 200 characters"),
    ("/predict", {"inputs": "hi", "parameters": {"top_k": 9}}, None, 422, "top_k"),
    ("/predict", None, b'{"inputs": "' + b"y" * 5000 + b'"}', 413, "over the limit of 4000"),
    ("/v2/models/nope/infer", {"inputs": []}, None, 404, "no model 'nope'"),
    ("/v2/models/art/infer", {"inputs": [{"name": "text", "datatype": "FP32", "data": [1]}]}, None, 422, "BYTES"),
    ("/v2/models/art/infer", {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]}]},
     None, 422, "shape [3] does not match its 2 texts"),
    ("/v2/models/art/infer", {"inputs": [{"name": "txt", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
     None, 422, "input name 'txt'"),
    ("/predict", None, b'{"inputs": "x \\ud800 y"}', 422, "text 0 holds a lone surrogate (U+D800)"),
    ("/predict", {"inputs": ["fine", "\x00\x01\x02"]}, None, 422, "text 1 has no printable character"),
    ("/predict", None, b'{"inputs": ' + b"[" * 40 + b'"a"' + b"]" * 40 + b"}", 400, "nested deeper than 32"),
    ("/predict", None, b"[" * 1500 + b"]" * 1500, 400, "nested deeper than 32"),
]


@pytest.mark.parametrize("path, body, raw, status, message", BAD)
def test_malformed_requests_get_a_4xx_and_the_server_stays_up(server, path, body, raw, status, message):
    port, _ = server
    got, text = call(port, path, body, raw, method="POST")
    assert got == status and message in json.loads(text)["error"]
    assert call(port, "/predict", {"inputs": "still up?"})[0] == 200


HOSTILE = [
    (None, b'{"inputs": ["x \\ud800 y", "ok"]}'),  # a lone surrogate beside a good text
    ({"inputs": "\x00\x07"}, None),  # control characters only
    (None, b"[" * 2000 + b"]" * 2000),  # nesting
    (None, b'{"inputs": ["unterminated'),  # malformed
    ({"inputs": [{"nested": 1}]}, None),  # wrong type
]


def test_hostile_clients_never_touch_the_good_ones(server, exported):
    """8 good clients and 4 hostile ones at once: every good request answers 200 with what the artifact
    predicts for its text alone; every hostile one gets its own 4xx."""
    port, _ = server
    art = Artifact.load(exported / "art")
    goods = [f"{t} ({i})" for i in range(4) for t in TEXTS][:40]
    expected = {t: art.predict([t])[0][0] for t in goods}
    good_results, bad_results = [], []

    def good(chunk):
        for text in chunk:
            status, body = call(port, "/predict", {"inputs": [text], "parameters": {"top_k": 3}})
            good_results.append((text, status, json.loads(body)))

    def hostile(i):
        body, raw = HOSTILE[i % len(HOSTILE)]
        for _ in range(10):
            bad_results.append(call(port, "/predict", body, raw, method="POST")[0])

    threads = ([threading.Thread(target=good, args=(goods[i::8],)) for i in range(8)]
               + [threading.Thread(target=hostile, args=(i,)) for i in range(4)])
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(good_results) == len(goods) and len(bad_results) == 40
    for text, status, rows in good_results:
        assert status == 200, (text, rows)
        got = {r["label"]: r["score"] for r in rows[0]}
        assert got == pytest.approx(dict(zip(art.labels, expected[text])), abs=1e-5)
    assert all(400 <= s < 500 for s in bad_results), bad_results


def test_a_stalled_body_gets_408_and_a_hung_up_upload_is_no_server_error(server):
    import socket

    port, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:  # promises 100 bytes, sends 10
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\":")
        reply = b""
        while b"}" not in reply:  # the status line and headers, then the JSON body
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:  # hangs up mid-body
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"in")
    time.sleep(0.5)
    text = call(port, "/metrics")[1].decode()
    assert 'jaxopt_client_aborts_total{route="/predict"} 1.0' in text
    assert 'status="500"' not in text


def test_metrics_and_the_monitor_report(server, exported, tmp_path):
    port, log = server
    for i in range(8):
        call(port, "/predict", {"inputs": [f"{t} {i}" for t in TEXTS]})
    status, text = call(port, "/metrics")
    text = text.decode()
    assert status == 200
    for name in ("jaxopt_requests_total", "jaxopt_request_latency_seconds_bucket", "jaxopt_batch_size_bucket",
                 "jaxopt_confidence_bucket", "jaxopt_predicted_total", 'jaxopt_drift{statistic="ks_pvalue"}'):
        assert name in text, name
    assert 'status="422"' in text or 'status="413"' in text or "jaxopt_errors" in text
    art = Artifact.load(exported / "art", verify=False)
    from jaxopt_llm.serving.report import monitor_report

    summary = monitor_report(art, str(log), str(tmp_path / "monitor"), window=30)
    assert summary["predictions"] >= 40 and summary["windows"] and (tmp_path / "monitor" / "drift.png").is_file()
    assert "| class | reference share | live share |" in (tmp_path / "monitor" / "report.md").read_text()


def test_drift_statistics_agree_with_scipy_and_detect_a_shift():
    from scipy.stats import chisquare, ks_2samp

    rng = np.random.default_rng(0)  # fixed draws; "no shift" is checked at the 1 % level
    ref = rng.beta(5, 2, 1000)
    same, shifted = rng.beta(5, 2, 300), rng.beta(2, 5, 300)
    assert drift.ks(same, ref) == pytest.approx(tuple(ks_2samp(same, ref)))
    assert drift.ks(same, ref)[1] > 0.01 and drift.ks(shifted, ref)[1] < 1e-6
    dist = np.array([0.5, 0.3, 0.2])
    live = rng.choice(3, 300, p=dist)
    counts = np.bincount(live, minlength=3)
    assert drift.chi2(live, dist) == pytest.approx(tuple(chisquare(counts, dist * 300)))
    assert drift.chi2(live, dist)[1] > 0.01 and drift.chi2(rng.choice(3, 300, p=[0.2, 0.3, 0.5]), dist)[1] < 1e-6
    x_ref = rng.normal(size=(80, 8))
    assert drift.mmd(rng.normal(size=(60, 8)), x_ref)[1] > 0.01
    assert drift.mmd(rng.normal(0.8, 1, size=(60, 8)), x_ref)[1] < 0.02


@pytest.mark.parametrize("field, change", [("labels", lambda m: m["labels"].reverse()),
                                           ("temperature", lambda m: m.update(temperature=2.0)),
                                           ("buckets", lambda m: m.update(buckets=[16])),
                                           ("special", lambda m: m["special"].update(pad=1))])
def test_a_changed_manifest_field_is_one_error_naming_it(exported, tmp_path, field, change):
    art = tmp_path / "art"
    shutil.copytree(exported / "art", art)
    manifest = json.loads((art / "manifest.json").read_text())
    change(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"manifest.json has changed since export \(field\(s\) {field}\)"):
        Artifact.load(art)
    (art / "manifest.sha256").unlink()
    with pytest.raises(ArtifactError, match="has no manifest.sha256"):
        Artifact.load(art)


def test_export_options_are_checked_before_anything_is_written_and_a_failure_leaves_nothing(exported, tmp_path,
                                                                                          monkeypatch, capsys):
    from jaxopt_llm import export as export_lib

    for argv, message in ((["--platforms", "cpu,gpu"], "--platforms 'cpu,gpu': use one or more of cpu, cuda"),
                          (["--buckets", "0"], "--buckets 0: every bucket must be a positive whole number"),
                          (["--buckets", "a,b"], "--buckets 'a,b': give comma-separated token counts")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            cli.main(["export", str(exported / "run"), "--out", str(tmp_path / "art"), *argv])
        assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.numpy.save_file", broken)  # after every check, in the middle of writing
    with pytest.raises(OSError, match="disk full"):
        export_lib.export(str(exported / "run"), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []  # no artifact and no .tmp folder
    with pytest.raises(OSError, match="disk full"):  # nor the folders made to hold it
        export_lib.export(str(exported / "run"), tmp_path / "artifacts" / "new" / "art")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        export_lib.export(str(exported / "run"), tmp_path / "file" / "art")
    monkeypatch.undo()  # and an export into folders that do not exist yet makes them
    art = export_lib.export(str(exported / "run"), tmp_path / "artifacts" / "new" / "art", buckets=(32,))
    assert art == tmp_path / "artifacts" / "new" / "art" and Artifact.load(art).labels == ["negative", "neutral",
                                                                                             "positive"]
    with pytest.raises(UserError, match="exists; pass a new folder"):  # and never into one that exists
        export_lib.export(str(exported / "run"), art)


def test_metrics_are_computed_off_the_request_path(exported):
    """A slow drift computation (2 s, as a large window's MMD can take) holds /metrics only: a /predict sent
    while it runs answers at once."""
    import uvicorn

    from jaxopt_llm.serving.app import create_app

    art = Artifact.load(exported / "art")
    app = create_app(art)
    monitor = app.state.metrics.drift

    def slow_report(min_window=30):
        time.sleep(2.0)
        return {}

    monitor.report = slow_report
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        assert call(port, "/predict", {"inputs": "warm up"})[0] == 200
        scrape = threading.Thread(target=call, args=(port, "/metrics"))
        scrape.start()
        time.sleep(0.3)  # the scrape is computing its drift statistics now
        start = time.perf_counter()
        assert call(port, "/predict", {"inputs": "love this airline"})[0] == 200
        waited = time.perf_counter() - start
        assert scrape.is_alive() and waited < 1.0, waited
        scrape.join()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_a_lone_request_is_not_delayed_by_max_wait_and_concurrent_ones_share_batches():
    """The batcher with a 2 s max_wait: one request alone is answered at once; requests queued while a batch
    runs form the next batch (sizes seen by on_batch), each still answered with its own rows."""
    import asyncio
    import time

    from jaxopt_llm.serving.batching import MicroBatcher

    sizes = []

    def predict(texts):
        time.sleep(0.05)  # the model call
        return ([len(t) for t in texts],)

    async def main():
        batcher = MicroBatcher(predict, max_batch=64, max_wait=2.0, on_batch=lambda n, s: sizes.append(n))
        await batcher.start()
        start = time.perf_counter()
        alone = await batcher.submit(["one"])
        lone = time.perf_counter() - start
        many = await asyncio.gather(*(batcher.submit(["x" * i]) for i in range(1, 17)))
        await batcher.stop()
        return alone, lone, many

    alone, lone, many = asyncio.run(main())
    assert alone == ([3],) and lone < 0.5  # not the 2 s max_wait
    assert [m[0] for m in many] == [[i] for i in range(1, 17)]
    assert max(sizes[1:]) > 1 and sum(sizes[1:]) == 16  # the concurrent ones were batched


# ---- ONNX: export --format onnx, ONNX Runtime against PyTorch and the jax.export functions, serve ----------

def random_texts(seed, n, longest=60):
    """n texts of 1 to `longest` words (past the artifact's 32 tokens, so truncation is exercised)."""
    rng = np.random.default_rng(seed)
    words = " ".join(TEXTS).replace(",", "").replace("!", "").split() + ["delayed", "gate", "crew", "refund"]
    return [" ".join(rng.choice(words, int(rng.integers(1, longest + 1)))) for _ in range(n)]


@pytest.fixture(scope="module")
def onnx_exported(exported):
    out = exported / "onnx"
    cli.main(["export", str(exported / "run"), "--out", str(out), "--format", "onnx", "--buckets", "16,32"])
    return out


def test_onnx_runtime_equals_pytorch_and_the_jax_functions_on_random_lengths(onnx_exported):
    import torch
    import transformers

    manifest = json.loads((onnx_exported / "manifest.json").read_text())
    assert manifest["onnx"]["file"] == "model.onnx" and manifest["files"]["model.onnx"]  # covered by the sha256s
    jax_art, onnx_art = Artifact.load(onnx_exported), Artifact.load(onnx_exported, backend="onnxruntime")
    reference = transformers.BertForSequenceClassification.from_pretrained(onnx_exported / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(onnx_exported / "hf")
    texts = random_texts(1, 40)
    enc = tokenizer(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(reference(**enc).logits, -1).numpy()
    got = onnx_art.predict(texts, max_batch=7)[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got, jax_art.predict(texts)[0], atol=1e-4)
    # the graph's axes are symbolic: any batch and any length up to 32, not only the buckets
    rng = np.random.default_rng(2)
    for b, t in ((1, 1), (5, 7), (3, 23), (9, 32)):
        lengths = rng.integers(1, t + 1, b)
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask > 0, rng.integers(1000, 30000, (b, t)), 0).astype(np.int32)
        types = np.zeros_like(ids)
        probs, cls = onnx_art.session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
        with torch.no_grad():
            out = reference(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long(),
                            token_type_ids=torch.tensor(types).long(), output_hidden_states=True)
        np.testing.assert_allclose(probs, torch.softmax(out.logits, -1).numpy(), atol=1e-4)
        np.testing.assert_allclose(cls, out.hidden_states[-1][:, 0].numpy(), atol=1e-4)


def test_serve_with_the_onnxruntime_backend_answers_as_pytorch(onnx_exported):
    import torch
    import transformers

    texts = random_texts(3, 6)
    reference = transformers.BertForSequenceClassification.from_pretrained(onnx_exported / "hf").eval()
    enc = transformers.AutoTokenizer.from_pretrained(onnx_exported / "hf")(
        texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(reference(**enc).logits, -1).numpy()
    process, port = start_server(onnx_exported, "--backend", "onnxruntime")
    try:
        status, body = call(port, "/predict", {"inputs": texts, "parameters": {"top_k": 3}})
        metadata = json.loads(call(port, f"/v2/models/{onnx_exported.name}")[1])
    finally:
        process.terminate()
        process.wait(timeout=60)
    assert status == 200 and metadata["platform"] == "onnxruntime_onnx"
    for rows, probs in zip(json.loads(body), expected):
        got = {r["label"]: r["score"] for r in rows}
        assert got == pytest.approx(dict(zip(["negative", "neutral", "positive"], probs)), abs=1e-4)
    assert "onnxruntime" in process.stderr.read()


def test_the_onnxruntime_server_path_imports_neither_jax_nor_flax(onnx_exported):
    """What `serve ART --backend onnxruntime` runs before its first answer: the serving parser, the artifact on
    ONNX Runtime (golden outputs checked), the app; in a fresh process, with no jax, flax or transformers."""
    code = ("import sys, json; from jaxopt_llm import cli; args = cli.build_parser(serving_only=True).parse_args("
            "['serve', sys.argv[1], '--backend', 'onnxruntime']); a = cli._artifact(args.artifact, "
            "backend=args.backend); from jaxopt_llm.serving.app import create_app; import uvicorn; "
            "out = a.classify(['love this airline'], top_k=3); "
            "bad = [m for m in ('jax', 'flax', 'transformers', 'torch', 'optax') if m in sys.modules]; "
            "print(json.dumps({'out': out, 'bad': bad}))")
    done = subprocess.run([sys.executable, "-c", code, str(onnx_exported)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bad"] == [] and len(result["out"][0]) == 3
    expected = Artifact.load(onnx_exported).classify(["love this airline"], top_k=3)
    assert [r["label"] for r in result["out"][0]] == [r["label"] for r in expected[0]]
    assert [r["score"] for r in result["out"][0]] == pytest.approx([r["score"] for r in expected[0]], abs=1e-4)


def test_onnx_backend_and_format_refusals_name_the_fix(exported, tmp_path):
    with pytest.raises(ArtifactError, match="no ONNX model; export the run again with --format onnx"):
        Artifact.load(exported / "art", backend="onnxruntime")
    with pytest.raises(ArtifactError, match="--backend 'tensorrt'"):
        Artifact.load(exported / "art", backend="tensorrt")
    with pytest.raises(UserError, match="backend='onnxruntime' runs exported artifacts"):
        inference.load(exported / "run", backend="onnxruntime")
    with pytest.raises(SystemExit):  # argparse names the choices
        cli.main(["export", str(exported / "run"), "--out", str(tmp_path / "x"), "--format", "tflite"])
    assert list(tmp_path.iterdir()) == []


def close_to_float32(probs, float_probs, bound: float) -> float:
    """Every probability within `bound` of float32's, and a predicted class changed only where float32's top two
    are within twice the largest difference (the test model is barely trained: its classes are near-ties, so
    the share of changed classes says nothing about accuracy; the test split's figures are in docs/results.md).
    Returns the largest difference."""
    difference = float(np.abs(probs - float_probs).max())
    assert difference <= bound, difference
    top2 = np.sort(float_probs, -1)[:, -2:]
    assert np.all((probs.argmax(-1) == float_probs.argmax(-1)) | (top2[:, 1] - top2[:, 0] <= 2 * difference))
    return difference


def test_int8_dynamic_onnx_runs_every_dense_layer_on_integer_kernels_close_to_float(exported, onnx_exported,
                                                                                     tmp_path):
    """--quantize int8-dynamic: every dense layer of model.onnx (q/k/v, out, intermediate, output per layer; pooler,
    head) is a MatMulInteger whose int8 weight times its column's scale is within half a scale of the float
    kernel; on 400 texts of random lengths the outputs stay close to the float32 artifact's; the manifest's
    figures are those of the texts it was given; it loads against its own golden outputs; and it is refused
    without --format onnx, leaving nothing behind."""
    import onnx
    from onnx import numpy_helper

    from jaxopt_llm.export import export
    from jaxopt_llm.serving.artifact import read_safetensors

    texts = random_texts(6, 400)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "neutral"}) + "\n" for t in texts))
    with pytest.raises(UserError, match="int8-dynamic: it runs on ONNX Runtime's integer kernels; add --format onnx"):
        export(str(exported / "run"), tmp_path / "q", quantize="int8-dynamic")
    assert not (tmp_path / "q").exists()
    cli.main(["export", str(exported / "run"), "--out", str(tmp_path / "q"), "--buckets", "16,32", "--format", "onnx",
              "--quantize", "int8-dynamic", "--data", str(data)])
    graph = onnx.load(tmp_path / "q" / "model.onnx").graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    # 4 per layer, pooler and head; the last layer's q/k/v kernel is cut in two (its queries are [CLS] only)
    assert len(integer) == 4 * 2 + 2 + 1 and not [n for n in graph.node if n.op_type in ("MatMul", "Einsum")
                                              and n.input[1] in weights]
    kernels = [w for w in read_safetensors(onnx_exported / "weights.safetensors").values() if w.ndim == 2]

    def rounds_to(q, w):  # symmetric, one scale per output column (max |w| / 127), from some block of w's columns
        scale = np.abs(w).max(0) / 127
        return q.shape[0] == w.shape[0] and any(
            np.all(np.abs(q * scale[o:o + q.shape[1]] - w[:, o:o + q.shape[1]]) <= scale[o:o + q.shape[1]] / 2 + 1e-6)
            for o in range(w.shape[1] - q.shape[1] + 1))

    for node in integer:
        q = weights[node.input[1]]
        assert q.dtype == np.int8 and not weights[node.input[3]].any()  # zero point 0
        assert sum(rounds_to(q, w) for w in kernels) == 1
    float_probs = Artifact.load(onnx_exported).predict(texts)[0]
    art = Artifact.load(tmp_path / "q", backend="onnxruntime")  # its own golden outputs, checked on load
    probs = art.predict(texts)[0]
    difference = close_to_float32(probs, float_probs, 0.05)
    changed = np.mean(probs.argmax(-1) != float_probs.argmax(-1))
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["quantize"] == "int8-dynamic"
    assert manifest["onnx"]["against_float32"] == {"texts": 400, "max_difference": pytest.approx(difference, abs=1e-5),
                                                   "changed_predictions": pytest.approx(changed)}
    assert manifest["files"]["model.onnx"] and "float.onnx" not in manifest["files"]


def test_int8_export_is_within_half_a_scale_per_weight_and_agrees_with_float(exported, onnx_exported, tmp_path):
    """Weight-only int8: every dense kernel in the weights file is int8 whose value times its column's scale is
    within half a scale of the float kernel (round to nearest), everything else is the float file's bytes;
    on 400 texts of random lengths every probability is within 0.005 of float32's and a class changes only at
    a near-tie, and the ONNX graph of the int8 export equals its jax functions."""
    from jaxopt_llm.serving.artifact import read_safetensors

    cli.main(["export", str(exported / "run"), "--out", str(tmp_path / "int8"), "--buckets", "16,32",
              "--quantize", "int8", "--format", "onnx"])
    floats = read_safetensors(onnx_exported / "weights.safetensors")
    ints = read_safetensors(tmp_path / "int8" / "weights.safetensors")
    floats, ints = [floats[k] for k in sorted(floats)], [ints[k] for k in sorted(ints)]
    kernels, i = 0, 0
    for w in floats:
        if ints[i].dtype == np.int8:
            q, scale = ints[i], ints[i + 1]
            assert scale.shape == (1, w.shape[1]) and np.abs(q).max() <= 127
            assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)
            kernels, i = kernels + 1, i + 2
        else:
            assert np.array_equal(ints[i], w)
            i += 1
    assert i == len(ints) and kernels == 4 * 2 + 2  # q/k/v, out, intermediate, output per layer; pooler, head
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["quantize"] == "int8"
    texts = random_texts(5, 400)
    float_probs = Artifact.load(onnx_exported).predict(texts)[0]
    int8_probs = Artifact.load(tmp_path / "int8").predict(texts)[0]
    close_to_float32(int8_probs, float_probs, 0.005)
    np.testing.assert_allclose(Artifact.load(tmp_path / "int8", backend="onnxruntime").predict(texts)[0], int8_probs,
                               atol=1e-4)
