"""Serving throughput and latency: `jaxopt-llm serve ARTIFACT` over HTTP on 127.0.0.1 against a
`transformers.pipeline("text-classification")` in PyTorch on the artifact's own HF export (ARTIFACT/hf), the
same texts, the same machine, the same run. Needs torch (the test extra).

    python experiments/serving_bench.py runs/tweets/deploy-*/artifact --texts runs/tweets/data-*/test.csv

Each client sends one text per request, back to back (bounded load: at most `clients` requests in flight).
The server micro-batches concurrent requests. The PyTorch side is served the same way (`--torch http`, the
default): a Starlette app on uvicorn in its own process, `POST /predict` with the same JSON body, the same
client; each request is one pipeline call (batch 1) under a lock (a pipeline object is not thread-safe), in
Starlette's thread pool -- what a minimal PyTorch server does without a batching layer. `--torch in-process`
calls the pipeline from the client threads directly instead (no HTTP on its side). Also: artifact size and
both servers' cold start (process start to first answer).

    python experiments/serving_bench.py ARTIFACT --texts TEST.csv --hostile 4 --no-torch

`--hostile M` adds M clients that send bad requests back to back (a lone surrogate beside a good text, control
characters only, deep nesting, malformed JSON) while the good clients run: the table then shows the good
clients' figures under attack, how many good requests failed (0 is the promise) and the hostile replies' codes.
"""

import argparse
import csv
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, text: str) -> None:
    request = urllib.request.Request(url, json.dumps({"inputs": text}).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()


HOSTILE = (b'{"inputs": ["x \\ud800 y", "fine"]}', b'{"inputs": "\\u0000\\u0007"}', b"[" * 2000 + b"]" * 2000,
           b'{"inputs": ["unterminated')


def hostile_clients(url: str, m: int):
    """M threads sending bad requests until stopped; (stop(), the status codes they got)."""
    codes, stop = [], threading.Event()

    def worker(i):
        while not stop.is_set():
            request = urllib.request.Request(url, HOSTILE[i % len(HOSTILE)], {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    codes.append(response.status)
            except urllib.error.HTTPError as err:
                codes.append(err.code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(m)]
    for t in threads:
        t.start()

    def end():
        stop.set()
        for t in threads:
            t.join()
        return codes

    return end


def load(call, texts: list[str], clients: int) -> dict:
    """`clients` threads share the texts; per-request latencies and the wall time."""
    latencies, lock, next_index, failed = [], threading.Lock(), [0], [0]

    def worker():
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(texts):
                return
            start = time.perf_counter()
            try:
                call(texts[i])
            except urllib.error.HTTPError:
                with lock:
                    failed[0] += 1
            latency = time.perf_counter() - start
            with lock:
                latencies.append(latency)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"clients": clients, "texts_per_s": len(texts) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "failed": failed[0]}


def torch_classifier(artifact: Path):
    """answer(text or texts): `transformers.pipeline` on the artifact's HF export cut at the artifact's
    max_length, one call at a time (a pipeline object is not thread-safe), on 2 threads."""
    import torch
    import transformers

    torch.set_num_threads(2)
    pipe = transformers.pipeline("text-classification", model=str(artifact / "hf"), device="cpu")
    max_length = json.loads((artifact / "manifest.json").read_text())["max_length"]
    lock = threading.Lock()

    def answer(inputs):
        with lock:
            return pipe(inputs, truncation=True, max_length=max_length)

    return answer


def torch_app(artifact: Path):
    """The PyTorch reference served: `POST /predict` {"inputs": text or [texts]} -> the pipeline's answer."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    answer = torch_classifier(artifact)

    async def predict(request: Request):
        from starlette.concurrency import run_in_threadpool

        body = await request.json()
        return JSONResponse(await run_in_threadpool(answer, body["inputs"]))

    return Starlette(routes=[Route("/predict", predict, methods=["POST"])])


def start_server(command: list[str], text: str) -> tuple[subprocess.Popen, str, float]:
    """(the server process, its /predict URL, seconds from process start to its first answer)."""
    port = free_port()
    start = time.perf_counter()
    server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/predict"
    while True:
        try:
            post(url, text)
            return server, url, time.perf_counter() - start
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"the server exited; run `{' '.join(command)}` by hand to see why") from None
            time.sleep(0.2)


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--texts", required=True, help="csv with a text column")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--hostile", type=int, default=0, help="clients sending bad requests meanwhile")
    parser.add_argument("--no-torch", action="store_true", help="our server only")
    parser.add_argument("--backend", choices=("jax", "onnxruntime"), default="jax",
                        help="the server's backend (onnxruntime: an artifact exported with --format onnx)")
    parser.add_argument("--torch", choices=("http", "in-process"), default="http",
                        help="the PyTorch pipeline behind the same HTTP stack, or called in-process")
    parser.add_argument("--serve-torch", action="store_true", help=argparse.SUPPRESS)  # the PyTorch server process
    parser.add_argument("--host", default="127.0.0.1", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_torch:
        import uvicorn

        uvicorn.run(torch_app(Path(args.artifact)), host=args.host, port=args.port, log_level="warning")
        return
    with open(args.texts, newline="", encoding="utf-8") as f:
        texts = [row["text"] for row in csv.DictReader(f)][:args.n]
    artifact = Path(args.artifact)
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file() and "hf" not in p.relative_to(artifact).parts)
    server, url, cold = start_server([sys.executable, "-m", "jaxopt_llm.cli", "serve", str(artifact), "--backend",
                                      args.backend], texts[0])
    try:
        for n in (1, 8, 32):  # every batch bucket compiled before timing
            load(lambda t: post(url, t), texts[:64], n)
        end = hostile_clients(url, args.hostile) if args.hostile else None
        ours = [load(lambda t: post(url, t), texts, int(c)) for c in args.clients.split(",")]
        codes = end() if end else []
    finally:
        stop(server)
    if args.hostile:
        print(f"{args.hostile} hostile clients sent {len(codes)} bad requests meanwhile; replies: "
              f"{dict(sorted((c, codes.count(c)) for c in set(codes)))}")
    if args.no_torch:
        print(f"{'clients':>8} {'texts/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'good requests failed':>21}")
        for a in ours:
            print(f"{a['clients']:>8} {a['texts_per_s']:>9.1f} {a['p50_ms']:>8.1f} {a['p99_ms']:>8.1f} {a['failed']:>21}")
        print(json.dumps({"artifact_bytes": size, "cold_start_s": cold, "ours": ours, "hostile": args.hostile,
                          "hostile_codes": {str(c): codes.count(c) for c in sorted(set(codes))}}))
        return
    torch_server, torch_cold = None, None
    if args.torch == "http":
        torch_server, torch_url, torch_cold = start_server(
            [sys.executable, __file__, str(artifact), "--texts", args.texts, "--serve-torch"], texts[0])
        torch_call = lambda t: post(torch_url, t)  # noqa: E731
    else:
        torch_call = torch_classifier(artifact)
    try:
        load(torch_call, texts[:32], 1)
        theirs = [load(torch_call, texts, int(c)) for c in args.clients.split(",")]
    finally:
        if torch_server is not None:
            stop(torch_server)
    print(f"artifact {size / 1e6:.1f} MB without the HF copy; server cold start {cold:.1f} s (process start to "
          f"first answer; PyTorch's server: {'-' if torch_cold is None else f'{torch_cold:.1f} s'}); {len(texts)} "
          f"texts, one per request; PyTorch {args.torch}")
    print(f"{'clients':>8} {'ours texts/s':>13} {'p50 ms':>8} {'p99 ms':>8}   {'PyTorch texts/s':>15} {'p50 ms':>8} "
          f"{'p99 ms':>8}  ratio")
    for a, b in zip(ours, theirs):
        print(f"{a['clients']:>8} {a['texts_per_s']:>13.1f} {a['p50_ms']:>8.1f} {a['p99_ms']:>8.1f}   "
              f"{b['texts_per_s']:>15.1f} {b['p50_ms']:>8.1f} {b['p99_ms']:>8.1f}  {a['texts_per_s'] / b['texts_per_s']:.2f}x")
    print(json.dumps({"artifact_bytes": size, "cold_start_s": cold, "torch": args.torch,
                      "torch_cold_start_s": torch_cold, "ours": ours, "pytorch": theirs}))


if __name__ == "__main__":
    main()
