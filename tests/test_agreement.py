"""Every path that predicts gives the same probabilities for the same text, whatever its length.

Texts of random lengths from 1 token to 3x the largest bucket (unicode included), in random batch sizes:
the run's own eval computation (training's tokenisation and the task's forward), `inference.load` on the run,
the exported artifact in-process and the server over HTTP agree to 1e-5 -- for a classifier, a 3-member
ensemble and a prompt run, each with a fitted temperature. A pipeline on texts longer than its bucket
deploys exactly what its calibrated stage predicts."""

import csv
import json

import jax
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, Server, overrides
from flax import nnx

from jaxopt_llm import cli, inference, pipeline
from jaxopt_llm import config as config_lib
from jaxopt_llm.assets import minilm_path
from jaxopt_llm.data.batches import tokenize
from jaxopt_llm.export import export
from jaxopt_llm.models import bert
from jaxopt_llm.serving.artifact import Artifact
from jaxopt_llm.steps import prompt as prompt_lib
from jaxopt_llm.steps.classify import ClassificationTask
from jaxopt_llm.train import train

MAX_LENGTH = 32  # the runs' data.max_length: the default export buckets are 16, 32
TEMPERATURE = 1.7
UNICODE = ["café", "naïve", "日本語", "🙂", "Ελληνικά", "עברית", "👍🏽", "straße", "Ø", "ﬁne", "x\u00a0y", "—"]


def random_texts(tokenizer, n: int, longest: int, seed: int) -> list[str]:
    """n texts of 1 .. `longest` tokens (without specials), words of the tweets and unicode mixed in."""
    rng = np.random.default_rng(seed)
    words = (tokenizer.decode(list(range(2000, 2600))).split() + UNICODE)
    texts = []
    targets = rng.integers(1, longest + 1, n)
    targets[:2] = (1, 2)  # the shortest texts always among them
    for target in targets:
        picked = []
        while True:
            picked.append(words[rng.integers(len(words))])
            if len(tokenizer(" ".join(picked), add_special_tokens=False)["input_ids"]) >= target:
                break
        texts.append(" ".join(picked))
    return texts


def softmax(z, t=1.0):
    z = np.asarray(z, np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """A classifier, a 3-member ensemble and a prompt run (on a tiny MLM), each trained briefly at
    data.max_length=32 with a temperature of 1.7 written, and each exported with the default buckets."""
    root = tmp_path_factory.mktemp("agree")
    items = overrides(setup, **{"train.steps": 2, "data.max_length": MAX_LENGTH})
    train(config_lib.load(None, items), root / "classifier")
    train(config_lib.load(None, [*overrides(setup, **{"train.steps": 1, "data.max_length": MAX_LENGTH}),
                                 "method=ensemble", "ensemble.members=3"]), root / "ensemble")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.BertConfig(**{**TINY, "vocab_size": tok.vocab_size, "max_position_embeddings": 64})
    torch.manual_seed(5)
    transformers.BertForMaskedLM(config).save_pretrained(root / "mlm")
    tok.save_pretrained(root / "mlm")
    train(config_lib.load(None, [*overrides(setup, **{"train.steps": 1, "data.max_length": MAX_LENGTH,
                                                      "model.name_or_path": root / "mlm"}),
                                 "task=prompt", "prompt.pattern={text} It was [MASK].",
                                 "prompt.verbalizer=negative=bad;neutral=okay;positive=great"]), root / "prompt")
    for kind in ("classifier", "ensemble", "prompt"):
        (root / kind / "temperature.json").write_text(json.dumps({"temperature": TEMPERATURE}))
        export(str(root / kind), root / f"{kind}.art", golden_texts=["a golden text"])
    return root, tok


def eval_probs(root, kind: str, texts: list[str], tok) -> np.ndarray:
    """What the run's own evaluation computes: training's tokenisation at data.max_length, the task's
    forward (members' probabilities averaged for the ensemble), softmax at the fitted temperature."""
    if kind == "prompt":
        model = bert.from_pretrained(root / kind, "masked-lm")
        task = prompt_lib.from_json(json.loads((root / kind / "prompt.json").read_text()), tok)
        batch = task.encode(texts)
        scores = jax.jit(lambda m, b: task.forward(m, m.embed(b["prompt_ids"]), b, None))(model, batch)
        return softmax(scores, TEMPERATURE)
    arrays = tokenize(tok, texts, None, MAX_LENGTH)
    folders = sorted((root / kind / "members").iterdir()) if kind == "ensemble" else [root / kind]
    task = ClassificationTask()
    members = []
    for folder in folders:
        model = bert.from_pretrained(folder, "sequence-classification")
        graphdef, state = nnx.split(model)

        @jax.jit
        def logits(state, batch):
            m = nnx.merge(graphdef, state)
            return task.forward(m, m.embed(batch["input_ids"]), batch, None)

        members.append(softmax(logits(state, arrays)))
    return softmax(np.log(np.mean(members, 0)), TEMPERATURE)


def in_batches(fn, texts, rng):
    """fn over random-sized consecutive chunks of texts, concatenated."""
    out, start = [], 0
    while start < len(texts):
        size = int(rng.integers(1, 12))
        out.append(fn(texts[start:start + size]))
        start += size
    return np.concatenate(out)


@pytest.mark.parametrize("kind", ["classifier", "ensemble", "prompt"])
def test_every_path_gives_the_same_probabilities_on_texts_of_every_length(runs, kind, capsys):
    root, tok = runs
    artifact = Artifact.load(root / f"{kind}.art")
    assert artifact.max_length == MAX_LENGTH
    if kind != "prompt":
        assert artifact.buckets == [16, 32]
    texts = random_texts(tok, 48, 3 * max(artifact.buckets), seed=len(kind))
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert min(lengths) <= 3 and max(lengths) > 2 * MAX_LENGTH  # short ones and ones far past the last bucket
    expected = eval_probs(root, kind, texts, tok)
    rng = np.random.default_rng(0)
    model = inference.load(root / kind, batch_size=int(rng.integers(1, 9)))
    assert (model.kind, model.max_length, model.temperature) == (kind, MAX_LENGTH, TEMPERATURE)
    np.testing.assert_allclose(in_batches(model.probs, texts, rng), expected, atol=1e-5)
    np.testing.assert_allclose(in_batches(lambda c: artifact.predict(c, max_batch=int(rng.integers(1, 6)))[0],
                                          texts, rng), expected, atol=1e-5)
    loaded = inference.load(root / f"{kind}.art")  # the artifact through the one loader
    assert (loaded.kind, loaded.max_length, loaded.temperature) == (kind, MAX_LENGTH, TEMPERATURE)
    np.testing.assert_allclose(loaded.probs(texts), expected, atol=1e-5)
    ours, theirs = model.logits(texts), loaded.logits(texts)  # equal up to a constant per row
    np.testing.assert_allclose(theirs - theirs.max(-1, keepdims=True), ours - ours.max(-1, keepdims=True), atol=1e-4)
    for model_ref in (root / kind, root / f"{kind}.art"):  # the command line, on the run and on its artifact
        capsys.readouterr()
        cli.main(["predict", "classify", "--model", str(model_ref), *texts[:5]])
        printed = [json.loads(line)["scores"] for line in capsys.readouterr().out.splitlines()]
        np.testing.assert_allclose(printed, expected[:5], atol=1e-5)
    server = Server(artifact)
    try:
        np.testing.assert_allclose(in_batches(server.probs, texts, rng), expected, atol=1e-5)
    finally:
        server.close()


def test_export_buckets_must_reach_the_runs_length(runs, tmp_path):
    root, _ = runs
    with pytest.raises(ValueError, match=r"--buckets 8,16 do not cover the model's max_length=32 tokens"):
        export(str(root / "classifier"), tmp_path / "art", buckets=(8, 16))
    with pytest.raises(ValueError, match=r"--buckets 0,32: every bucket must be a positive whole number"):
        export(str(root / "classifier"), tmp_path / "art", buckets=(0, 32))
    assert not list(tmp_path.iterdir())  # refused before anything was written


LONG_PIPELINE = '''"""jaxopt-llm pipeline run {file}"""
from jaxopt_llm.pipeline import Pipeline, Split, Stage


def get_pipeline():
    return Pipeline(name="long", data=Split(source={source!r}, test_size=40, dev_size=24), max_length={length},
                    batch_size=8, robust_examples=8, pgd_steps=1, stages=(
        Stage("finetune", "finetune", model={model!r}, overrides={train!r}),
        Stage("calibrated", "calibrate", model="@finetune"),
        Stage("deploy", "export", model="@calibrated"),
    ))
'''


def test_a_pipeline_on_texts_longer_than_the_bucket_deploys_what_it_calibrated(setup, runs, tmp_path):
    _, tok = runs
    texts = random_texts(tok, 100, 4 * MAX_LENGTH, seed=7)
    texts = [t + " " + u for t, u in zip(texts, texts[1:] + texts[:1])]  # most past 32 tokens
    assert np.mean([len(tok(t)["input_ids"]) > MAX_LENGTH for t in texts]) > 0.6
    source = tmp_path / "long.csv"
    with source.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "sentiment"])
        writer.writerows([t, ("a", "b", "c")[i % 3]] for i, t in enumerate(texts))
    train_items = {"parallel.devices": 1, "data.max_length": MAX_LENGTH, "data.eval_fraction": 0.25,
                   "train.batch_size": 8, "train.learning_rate": 1e-3, "train.warmup_steps": 0, "train.progress": False,
                   "train.steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3}
    file = tmp_path / "long.py"
    file.write_text(LONG_PIPELINE.format(file=file, source=str(source), length=MAX_LENGTH, model=str(setup / "model"),
                                         train=train_items))
    rows = {r["name"]: r for r in pipeline.run(pipeline.load(file), tmp_path / "work")}

    def read(name):
        folder = rows[name]["folder"]
        return (json.loads((folder / "metrics.json").read_text()),
                [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()])

    (calibrated, cal_rows), (deployed, dep_rows) = read("calibrated"), read("deploy")
    assert calibrated["max_length"] == deployed["max_length"] == MAX_LENGTH
    assert calibrated["temperature"] == pytest.approx(deployed["temperature"], abs=1e-12) != 1.0
    assert deployed["accuracy"] == pytest.approx(calibrated["accuracy"], abs=1e-6)
    assert deployed["nll"] == pytest.approx(calibrated["nll"], abs=1e-6)
    assert [r["predicted"] for r in dep_rows] == [r["predicted"] for r in cal_rows]
    np.testing.assert_allclose([r["scores"] for r in dep_rows], [r["scores"] for r in cal_rows], atol=2e-6)
    assert deployed["device"] and deployed["cpu"]  # where its latency was measured, recorded at measure time
