"""Evaluation sweeps: checkpoints x temperatures in one program against separate evaluations, one compile,
chunked == unchunked, and mismatched runs refused."""

import jax
import numpy as np
import pytest
from conftest import overrides
from flax import nnx

from jaxopt_llm import cli, sweep
from jaxopt_llm import config as config_lib
from jaxopt_llm import data as data_lib
from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm.models import bert
from jaxopt_llm.parallel import compile_count
from jaxopt_llm.steps.task import DataNeeds
from jaxopt_llm.train import train


@pytest.fixture(scope="module")
def run(setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep") / "run"
    train(config_lib.load(None, overrides(setup, **{"train.steps": 6, "train.checkpoint_every": 2,
                                                    "train.keep_checkpoints": 5})), workdir)
    return workdir


@pytest.fixture(scope="module")
def eval_data(setup, run):
    config = config_lib.load(None, overrides(setup))
    return data_lib.load(config.data, bert.load_tokenizer(run), DataNeeds(labels=True),
                         names=("negative", "neutral", "positive"))


TEMPERATURES = (0.5, 1.0, 1.5, 3.0)


def test_three_checkpoints_by_four_temperatures_equal_twelve_evaluations(run, eval_data):
    s = sweep.stack([str(run)], checkpoints="all")
    assert s.steps == [2, 4, 6]
    before = compile_count()
    rows = sweep.evaluate(s, eval_data.eval, TEMPERATURES, batch_size=8)
    assert compile_count() - before == 1  # 3 checkpoints x 4 temperatures x every batch: one program
    model = bert.from_pretrained(run, "sequence-classification")
    graphdef = nnx.split(model)[0]
    labels = eval_data.eval["labels"]
    for i in range(3):  # each point evaluated on its own, with plain numpy
        params = jax.tree.map(lambda x: x[i], s.params)
        m = nnx.merge(graphdef, params)
        logits = np.asarray(m(eval_data.eval["input_ids"], attention_mask=eval_data.eval["attention_mask"],
                              token_type_ids=eval_data.eval["token_type_ids"]), np.float64)
        confusion = np.zeros((3, 3))
        np.add.at(confusion, (labels, logits.argmax(-1)), 1)
        for k, t in enumerate(TEMPERATURES):
            z = logits / t
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            expected = metrics_lib.classification(p, labels)
            got = rows[i * 4 + k]
            assert (got["step"], got["temperature"]) == (s.steps[i], t)
            for key in ("accuracy", "f1", "nll", "ece", "brier"):
                assert got[key] == pytest.approx(expected[key], abs=1e-6), (i, t, key)
    final = [r for r in rows if r["step"] == 6 and r["temperature"] == 1.0][0]
    exported = sweep.evaluate(sweep.stack([str(run)]), eval_data.eval, (1.0,), batch_size=8)[0]
    assert final["accuracy"] == exported["accuracy"] and final["nll"] == pytest.approx(exported["nll"], abs=1e-6)


def test_chunked_equals_unchunked_and_the_cli_writes_every_point(run, eval_data, setup, tmp_path, capsys):
    s = sweep.stack([str(run)], checkpoints="all")
    whole = sweep.evaluate(s, eval_data.eval, (1.0, 2.0), (0.0, 0.05), steps=2, batch_size=8)
    chunked = sweep.evaluate(s, eval_data.eval, (1.0, 2.0), (0.0, 0.05), steps=2, batch_size=8, chunk=2)
    assert len(whole) == 3 * (2 + 2)
    for a, b in zip(whole, chunked):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a if k != "model")
    cli.main(["sweep", "eval", "--model", str(run), "--checkpoints", "every:4", "--data", str(setup / "tweets.csv"),
              "--out", str(tmp_path / "points.csv"), "--plot", str(tmp_path / "curve.png"), "temperature=1,2",
              "data.label_column=sentiment", "data.max_length=32"])
    lines = (tmp_path / "points.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 2 and (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"  # steps 4 and 6


def test_runs_of_other_labels_or_architecture_are_one_clear_error(run, setup, tmp_path):
    from conftest import hf_model

    tokenizer = bert.load_tokenizer(run)
    hf_model("sequence-classification", vocab_size=30522, max_position_embeddings=64).save_pretrained(
        tmp_path / "labels")  # LABEL_0..2
    tokenizer.save_pretrained(tmp_path / "labels")
    with pytest.raises(ValueError, match=r"labels .* a sweep stacks runs of one label set"):
        sweep.stack([str(run), str(tmp_path / "labels")])
    hf_model("sequence-classification", vocab_size=30522, num_hidden_layers=1,
             id2label={0: "negative", 1: "neutral", 2: "positive"},
             label2id={"negative": 0, "neutral": 1, "positive": 2}).save_pretrained(tmp_path / "small")
    tokenizer.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="differ in architecture"):
        sweep.stack([str(run), str(tmp_path / "small")])
