"""The HTTP server of an artifact (Starlette; run with uvicorn). Routes only parse and reply; batching,
metrics and drift live in their own modules.

  POST /predict                    {"inputs": str | [str], "parameters": {"top_k": k}} ->
                                   [{"label", "score"}, ...] for a string, one such list per text for a list
  GET  /v2/health/live, /v2/health/ready, /v2/models/{name}, POST /v2/models/{name}/infer
                                   the KServe Open Inference Protocol v2
  GET  /metrics                    Prometheus text format

Bad requests get a 4xx JSON {"error": message} and touch no other request: malformed JSON (400), JSON nested
deeper than 32 levels (400), a body that stalls for longer than `Limits.body_seconds` (408), wrong types,
empty input or a KServe tensor whose name, datatype or shape does not match its data (422), too many texts,
texts or bodies over the limits (413). Each request's texts are checked and encoded on their own before they
join a batch: a text with a lone surrogate (invalid Unicode, e.g. "\ud800"), or with no printable character at
all (only control characters or spaces), is refused with 422 naming the text. A client that hangs up while
sending is counted in `jaxopt_client_aborts`, not as an error, and its wait stays out of the latency
histogram. `/metrics` computes the drift statistics in a worker thread, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jaxopt_llm import tagging
from jaxopt_llm.serving.batching import MicroBatcher
from jaxopt_llm.serving.drift import DriftMonitor
from jaxopt_llm.serving.monitoring import Metrics

MAX_DEPTH = 32  # JSON nesting a request may use


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_chars: int = 10_000
    body_seconds: float = 10.0  # a body must arrive whole within this time (408 otherwise)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


async def _json(request: Request, limits: Limits):
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        raise BadRequest(f"body of {length} bytes is over the limit of {limits.max_body_bytes}.", 413)
    body = b""
    chunks = request.stream().__aiter__()
    deadline = time.monotonic() + limits.body_seconds
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), max(deadline - time.monotonic(), 0.0))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise BadRequest(f"the body did not arrive within {limits.body_seconds:g} s.", 408) from None
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise BadRequest(f"body is over the limit of {limits.max_body_bytes} bytes.", 413)
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON ({err}).") from None
    except RecursionError:
        raise BadRequest(f"the JSON is nested deeper than {MAX_DEPTH} levels.") from None
    if _depth(value) > MAX_DEPTH:
        raise BadRequest(f"the JSON is nested deeper than {MAX_DEPTH} levels.")
    return value


def _depth(value) -> int:
    """How deeply lists and objects nest in a JSON value (iteratively: no recursion to exhaust)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                todo += [(x, level + 1) for x in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _texts(value, limits: Limits, what: str = '"inputs"') -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest(f'{what} must be a string or a list of strings.', 422)
    if not texts or not all(t.strip() for t in texts):
        raise BadRequest(f"{what} is empty, or holds an empty text.", 422)
    if len(texts) > limits.max_texts:
        raise BadRequest(f"{len(texts)} texts in one request; the limit is {limits.max_texts}.", 413)
    long = [i for i, t in enumerate(texts) if len(t) > limits.max_chars]
    if long:
        raise BadRequest(f"text(s) {long[:5]} are longer than {limits.max_chars} characters.", 413)
    for i, t in enumerate(texts):
        bad = next((c for c in t if 0xD800 <= ord(c) <= 0xDFFF), None)
        if bad is not None:
            raise BadRequest(f"text {i} holds a lone surrogate (U+{ord(bad):04X}), which is not valid Unicode; send "
                             "the text as UTF-8 or with paired surrogates.", 422)
        if not any(c.isprintable() and not c.isspace() for c in t):
            raise BadRequest(f"text {i} has no printable character (only spaces or control characters).", 422)
    return texts


def create_app(artifact, limits: Limits = Limits(), max_batch: int = 32, max_wait: float = 0.005,
               window: int = 500, log_file: str | None = None) -> Starlette:
    tagger = artifact.manifest["kind"] == "tagger"  # entities per text, not class probabilities
    reader = artifact.manifest["kind"] == "reader"  # an answer per (question, context)
    drift = DriftMonitor(artifact.reference, artifact.reference_cls, window=window)
    metrics = Metrics(artifact.labels, drift)
    work = artifact.answer_pairs if reader else artifact.tag_probs_encoded if tagger else artifact.predict_encoded
    batcher = MicroBatcher(work, max_batch, max_wait, on_batch=metrics.observe_batch)
    log = open(log_file, "a") if log_file else None  # noqa: SIM115 - closed at shutdown

    async def encode(texts: list[str]) -> list:
        try:  # each request encoded on its own: a text the tokenizer refuses fails this request only
            return await asyncio.get_running_loop().run_in_executor(None, artifact.encode, texts)
        except Exception as err:
            raise BadRequest(f"the texts could not be tokenized ({type(err).__name__}: {err}).", 422) from None

    async def entities(texts: list[str], parameters: dict) -> list[list[dict]]:
        aggregation = parameters.get("aggregation_strategy", "first")
        if aggregation not in tagging.AGGREGATIONS:
            raise BadRequest(f'"aggregation_strategy" {aggregation!r}: use one of {", ".join(tagging.AGGREGATIONS)}.',
                             422)
        encodings = await encode(texts)
        (probs,) = await batcher.submit(encodings)
        rows = [tagging.decode(t, e, p, artifact.labels, aggregation) for t, e, p in zip(texts, encodings, probs)]
        if log is not None:
            for t, row in zip(texts, rows):
                log.write(json.dumps({"time": time.time(), "text": t, "entities": row}) + "\n")
            log.flush()
        return rows

    def pairs_of(value) -> list[tuple[str, str]]:
        items = [value] if isinstance(value, dict) else value
        if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
            raise BadRequest('"inputs" must be {"question": ..., "context": ...} or a list of them.', 422)
        questions = _texts([x.get("question") for x in items] or None, limits, '"question"')
        contexts = _texts([x.get("context") for x in items], limits, '"context"')
        return list(zip(questions, contexts))

    async def answer(pairs: list[tuple[str, str]]) -> list[dict]:
        rows = (await batcher.submit(pairs))[0]
        if log is not None:
            for (q, c), row in zip(pairs, rows):
                log.write(json.dumps({"time": time.time(), "question": q, "context": c, **row}) + "\n")
            log.flush()
        return rows

    async def run(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = await encode(texts)
        probs, cls = await batcher.submit(encodings)
        metrics.observe_predictions(probs, cls)
        if log is not None:
            for t, p, c in zip(texts, probs, cls):
                log.write(json.dumps({"time": time.time(), "text": t, "probabilities": [round(float(x), 6) for x in p],
                                      "cls": [round(float(x), 4) for x in c]}) + "\n")
            log.flush()
        return probs, cls

    def endpoint(route: str, handler):
        async def wrapped(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await handler(request)
            except ClientDisconnect:  # the client hung up while sending: no one to answer, not a server error
                metrics.aborts.labels(route).inc()
                return Response(status_code=499)
            except BadRequest as err:
                response = JSONResponse({"error": str(err)}, status_code=err.status)
            except Exception as err:  # the server stays up; the client learns what failed
                response = JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=500)
            metrics.requests.labels(route, str(response.status_code)).inc()
            if response.status_code >= 400:
                metrics.errors.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
            return response

        return wrapped

    async def predict(request: Request) -> Response:
        body = await _json(request, limits)
        if not isinstance(body, dict) or "inputs" not in body:
            raise BadRequest('the body must be a JSON object with "inputs".', 422)
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest('"parameters" must be an object.', 422)
        if tagger:  # Hugging Face's token-classification shape: per text, its entities
            rows = await entities(_texts(body["inputs"], limits), parameters)
            return JSONResponse(rows[0] if isinstance(body["inputs"], str) else rows)
        if reader:  # Hugging Face's question-answering shape: {score, start, end, answer}
            rows = await answer(pairs_of(body["inputs"]))
            return JSONResponse(rows[0] if isinstance(body["inputs"], dict) else rows)
        top_k = parameters.get("top_k", 1)
        if top_k is None:
            top_k = len(artifact.labels)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= len(artifact.labels):
            raise BadRequest(f'"top_k" must be an integer from 1 to {len(artifact.labels)}.', 422)
        texts = _texts(body["inputs"], limits)
        probs, _ = await run(texts)
        order = np.argsort(-probs, -1)[:, :top_k]
        rows = [[{"label": artifact.labels[int(j)], "score": float(p[j])} for j in idx] for p, idx in zip(probs, order)]
        return JSONResponse(rows[0] if isinstance(body["inputs"], str) else rows)

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": batcher.worker is not None})

    def _model_name(request: Request) -> None:
        if request.path_params["name"] != artifact.name:
            raise BadRequest(f"no model {request.path_params['name']!r}; this server has {artifact.name!r}.", 404)

    platform = "onnxruntime_onnx" if artifact.session is not None else "jax"  # what runs the model (KServe v2)

    async def model(request: Request) -> Response:
        _model_name(request)
        return JSONResponse({"name": artifact.name, "platform": platform, "versions": [str(artifact.manifest.get(
            "versions", {}).get("jaxopt_llm"))],
            "inputs": [{"name": "question", "datatype": "BYTES", "shape": [-1]},
                       {"name": "context", "datatype": "BYTES", "shape": [-1]}] if reader else [
                {"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "answer", "datatype": "BYTES", "shape": [-1]},
                        {"name": "score", "datatype": "FP32", "shape": [-1]},
                        {"name": "start", "datatype": "INT32", "shape": [-1]},
                        {"name": "end", "datatype": "INT32", "shape": [-1]}] if reader else
            [{"name": "entities", "datatype": "BYTES", "shape": [-1]}] if tagger else [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(artifact.labels)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]}]})

    async def infer(request: Request) -> Response:
        _model_name(request)
        body = await _json(request, limits)
        inputs = body.get("inputs") if isinstance(body, dict) else None
        names = ["question", "context"] if reader else ["text"]
        if (not isinstance(inputs, list) or len(inputs) != len(names)
                or not all(isinstance(x, dict) for x in inputs)):
            raise BadRequest(f'"inputs" must be a list of {len(names)} tensor(s) {{"name", "shape", "datatype", '
                             f'"data"}}: {", ".join(names)}.', 422)
        by_name = {}
        for tensor in inputs:
            if tensor.get("name") not in names:
                raise BadRequest(f'input name {tensor.get("name")!r}: this model takes inputs named '
                                 f'{", ".join(repr(n) for n in names)}.', 422)
            if tensor.get("datatype") != "BYTES":
                raise BadRequest(f'input datatype {tensor.get("datatype")!r}: send the texts as "BYTES".', 422)
            texts = _texts(tensor.get("data"), limits, '"data"')
            shape = tensor.get("shape")
            if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                    or shape not in ([len(texts)], [len(texts), 1])):
                raise BadRequest(f'input shape {shape!r} does not match its {len(texts)} texts: send '
                                 f'[{len(texts)}].', 422)
            by_name[tensor["name"]] = texts
        if reader:
            if set(by_name) != set(names) or len(by_name["question"]) != len(by_name["context"]):
                raise BadRequest('send one "question" and one "context" tensor of the same length.', 422)
            rows = await answer(list(zip(by_name["question"], by_name["context"])))
            n = len(rows)
            return JSONResponse({"model_name": artifact.name, "id": body.get("id"), "outputs": [
                {"name": "answer", "datatype": "BYTES", "shape": [n], "data": [r["answer"] for r in rows]},
                {"name": "score", "datatype": "FP32", "shape": [n], "data": [r["score"] for r in rows]},
                {"name": "start", "datatype": "INT32", "shape": [n], "data": [r["start"] for r in rows]},
                {"name": "end", "datatype": "INT32", "shape": [n], "data": [r["end"] for r in rows]}]})
        texts = by_name["text"]
        if tagger:  # each text's entities as a JSON string
            parameters = body.get("parameters") or {}
            rows = await entities(texts, parameters if isinstance(parameters, dict) else {})
            return JSONResponse({"model_name": artifact.name, "id": body.get("id"), "outputs": [
                {"name": "entities", "datatype": "BYTES", "shape": [len(texts)],
                 "data": [json.dumps(row, ensure_ascii=False) for row in rows]}]})
        probs, _ = await run(texts)
        return JSONResponse({"model_name": artifact.name, "id": body.get("id"), "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel().tolist()},
            {"name": "label", "datatype": "BYTES", "shape": [len(texts)],
             "data": [artifact.labels[int(i)] for i in probs.argmax(-1)]}]})

    async def prometheus(request: Request) -> Response:  # drift statistics in a worker thread
        body = await asyncio.get_running_loop().run_in_executor(None, metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:  # graceful shutdown: queued requests are answered first
            await batcher.stop()
            if log is not None:
                log.close()
            served = sum(s.value for m in metrics.requests.collect() for s in m.samples if s.name.endswith("_total"))
            print(f"stopped after {int(served)} requests", file=sys.stderr)

    routes = [Route("/predict", endpoint("/predict", predict), methods=["POST"]),
              Route("/v2/health/live", endpoint("/v2/health/live", live), methods=["GET"]),
              Route("/v2/health/ready", endpoint("/v2/health/ready", ready), methods=["GET"]),
              Route("/v2/models/{name}", endpoint("/v2/models", model), methods=["GET"]),
              Route("/v2/models/{name}/infer", endpoint("/v2/models/infer", infer), methods=["POST"]),
              Route("/metrics", endpoint("/metrics", prometheus), methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.metrics, app.state.batcher = metrics, batcher
    return app
