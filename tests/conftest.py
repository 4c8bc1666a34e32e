"""Shared fixtures. Environment is fixed before JAX starts: 8 fake CPU devices, offline hub."""

import os
import tempfile


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices. XLA:CPU's older elemental emitters
    (fusion emitters off) compile a tiny train step in 2.7 s instead of 7 s at the reduced optimisation level
    below: the suite compiles far more than it runs. Both sides of every comparison run under these flags."""
    return f"--xla_force_host_platform_device_count={devices} --xla_cpu_use_fusion_emitters=false"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="jaxopt-llm-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's cheaper optimisation level halves compile time; every comparison runs both sides under it
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# A persistent compilation cache of this test process only (new and empty, shared with the commands its tests
# start): runs of the same tiny config, in-process or not, compile it once. Counts stay exact: a program
# loaded from the cache counts as compiled (parallel.compile_count).
os.environ["JAXOPT_LLM_COMPILE_CACHE"] = "1"
os.environ["JAXOPT_LLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxopt-llm-xla-cache-")

import csv  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
from jaxopt_llm.cli import compile_cache  # noqa: E402

compile_cache()

# Distinct sizes so that a swapped axis fails loudly: vocab 101, hidden 24, 3 heads of 8, FFN 40, 2 layers.
TINY = dict(vocab_size=101, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
            max_position_embeddings=40, type_vocab_size=2, initializer_range=0.1)

HF_CLASSES = {
    "base": "BertModel",
    "masked-lm": "BertForMaskedLM",
    "pretraining": "BertForPreTraining",
    "sequence-classification": "BertForSequenceClassification",
    "token-classification": "BertForTokenClassification",
    "question-answering": "BertForQuestionAnswering",
}


def hf_model(task, seed=0, **changes):
    """A random transformers BERT for `task` in eval mode."""
    import torch
    import transformers

    config = transformers.BertConfig(**{**TINY, "num_labels": 2 if task == "question-answering" else 3, **changes})
    torch.manual_seed(seed)
    return getattr(transformers, HF_CLASSES[task])(config).eval()


def torch_output(model, task, ids, mask, types):
    """The output our model returns for `task`, computed by the PyTorch reference, as numpy."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types))
    if task == "base":
        return out.last_hidden_state.numpy()
    if task == "pretraining":
        return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()
    if task == "question-answering":
        return out.start_logits.numpy(), out.end_logits.numpy()
    return out.logits.numpy()


@pytest.fixture(scope="session")
def batch():
    """3 x 11 token ids with padding in two rows and both token types."""
    rng = np.random.RandomState(0)
    ids = rng.randint(1, TINY["vocab_size"], (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """task -> folder of a random tiny HF model written by transformers' save_pretrained."""
    dirs = {}
    for task in HF_CLASSES:
        d = tmp_path_factory.mktemp(task)
        hf_model(task).save_pretrained(d)
        dirs[task] = d
    return dirs


# ---- steps: a batch of token ids, the tasks, and running a step under one backend -------------------

MASK_ID, VOCAB, B, T = 3, 101, 16, 12


def make_batch(seed=0, b=B):
    """b x 12 tokens with [CLS] = 1, [SEP] = 2, padding, 3 class labels and next-sentence labels."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(5, VOCAB, (b, T)).astype(np.int32)
    lengths = rng.randint(6, T + 1, b)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = 1  # [CLS]
    ids[np.arange(b), lengths - 1] = 2  # [SEP]
    ids[mask == 0] = 0
    special = ((ids <= 2) | (mask == 0)).astype(np.int32)
    types = np.zeros_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "special_tokens_mask": special,
            "labels": rng.randint(0, 3, b).astype(np.int32), "index": np.arange(b, dtype=np.int32) + 100 * seed,
            "weight": np.ones(b, np.float32), "next_sentence_label": rng.randint(0, 2, b).astype(np.int32)}


def masking():
    from jaxopt_llm.steps.mlm import Masking

    return Masking(mask_token_id=MASK_ID, vocab_size=VOCAB, rate=0.15, max_predictions=4)


def task_for(head):
    """The task whose step trains a model with `head`."""
    from jaxopt_llm.steps.classify import ClassificationTask
    from jaxopt_llm.steps.mlm import MaskedLMTask

    if head == "sequence-classification":
        return ClassificationTask()
    return MaskedLMTask(masking(), next_sentence=head == "pretraining")


def run_backend(make_step, params, backend, n_devices, steps, fsdp=False, aux=None):
    """`steps` SGD steps of `make_step(tx)` on batches make_batch(0..) under one backend ->
    (metric means per step, final params, compiles per step).

    SGD: sharding must give the same gradients. Adam would turn rounding noise in exactly-zero gradients
    (the key bias has none: softmax ignores a constant) into lr-sized steps, hiding what is compared."""
    import optax

    from jaxopt_llm import state as state_lib
    from jaxopt_llm.config import ParallelConfig
    from jaxopt_llm.parallel import Parallel, compile_count
    from jaxopt_llm.steps.common import mean_metrics

    tx = optax.sgd(0.5)
    parallel = Parallel(ParallelConfig(backend=backend, fsdp=fsdp), jax.devices()[:n_devices])
    state = parallel.put_state(state_lib.create(params, tx))
    aux = parallel.put_state(aux)
    train = parallel.compile_train(make_step(tx), state, aux)
    key = parallel.put_key(jax.random.key_data(jax.random.key(0)))
    means, compiles = [], []
    for i in range(steps):
        before = compile_count()
        state, metrics = train(state, parallel.put_batch(make_batch(i)), key, aux)
        compiles.append(compile_count() - before)
        means.append(mean_metrics(metrics))
    return means, jax.device_get(parallel.host_state(state).params), compiles


# ---- the training loop: a tiny random BERT with the MiniLM vocabulary, and real tweets ----------------


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny random BERT (seed 0) with the MiniLM vocabulary, and 96 real tweets as clean UTF-8 CSV."""
    import torch
    import transformers

    from jaxopt_llm.assets import minilm_path, tweets_csv_path

    root = tmp_path_factory.mktemp("train")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.BertConfig(**{**TINY, "vocab_size": tok.vocab_size, "max_position_embeddings": 64})
    torch.manual_seed(0)  # every run of the suite trains from the same weights
    transformers.BertModel(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = list(csv.DictReader(tweets_csv_path().read_text(encoding="utf-8", errors="replace").splitlines()))
    picked = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:96]]
    with (root / "tweets.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["sentiment", "text"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(picked)
    (root / "lines.txt").write_text("\n".join(r["text"] for r in picked))
    return root


def overrides(setup, devices=1, **extra):
    """key=value overrides of a tiny fine-tune on the `setup` model and tweets; `extra` adds or replaces.
    One device unless `devices` says otherwise (None: all 8): the steps' agreement across devices is
    tests/test_steps.py's subject, and a run over 8 fake devices on 2 cores costs twice the time."""
    items = {"model.name_or_path": setup / "model", "data.train_file": setup / "tweets.csv",
             "data.label_column": "sentiment", "data.max_length": 32, "data.eval_fraction": 0.25,
             "train.batch_size": 8, "train.learning_rate": 1e-3, "train.warmup_steps": 0, "train.progress": False,
             "train.steps": 6, "train.log_every": 2, "train.eval_every": 3, "train.checkpoint_every": 3,
             **({"parallel.devices": devices} if devices else {}), **extra}
    return [f"{k}={v}" for k, v in items.items()]


def free_port() -> int:
    """A port free right now on every interface (servers here bind 127.0.0.1, or [::] as jax.distributed's
    coordinator does; a fixed port can be held, e.g. as another connection's ephemeral port)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
            return s.getsockname()[1]
    except OSError:  # no IPv6
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]


def records(workdir, split):
    """The logged events of one split ("train" or "eval") of a run folder."""
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# Longest files first: `-n 2 --dist loadfile` hands whole files to the two workers in collection order, and a
# long file collected last (alphabetically test_train.py) would run alone at the end while the other worker
# idles. Order within a file is kept (module fixtures).
LONGEST_FIRST = ("test_pipeline.py", "test_cloud.py", "test_family_matrix.py", "test_train.py", "test_steps.py",
                 "test_adversarial.py", "test_prompt.py", "test_ensemble.py", "test_distill.py", "test_reliability.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


class Server:
    """The app of an artifact under uvicorn in a thread, on a free 127.0.0.1 port."""

    def __init__(self, artifact):
        import uvicorn

        from jaxopt_llm.serving.app import create_app

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(artifact), host="127.0.0.1", port=self.port,
                                                    log_level="warning", log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.labels = artifact.labels

    def probs(self, texts: list[str]) -> np.ndarray:
        body = json.dumps({"inputs": texts, "parameters": {"top_k": None}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/predict", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            rows = json.loads(response.read())
        return np.asarray([[next(x["score"] for x in row if x["label"] == name) for name in self.labels]
                           for row in rows])

    def post(self, path: str, body) -> tuple[int, object]:
        """(status, decoded JSON) of a POST of `body` as JSON, error statuses included."""
        import urllib.error

        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
