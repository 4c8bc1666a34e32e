"""BertConfig presets and validation; full-size shapes through jax.eval_shape (nothing allocated)."""

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxopt_llm.models.bert import Bert, BertConfig


@pytest.mark.parametrize("preset", ["base", "large"])
def test_full_size_shapes_without_allocating(preset):
    config = getattr(BertConfig, preset)()
    abstract = nnx.eval_shape(lambda: Bert(config, "pretraining", rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    with torch.device("meta"):  # the reference, also without memory
        ref = transformers.BertForPreTraining(config.to_hf_config())
    # the tied decoder weight is the same tensor as the word embeddings in both
    assert ours == sum(p.numel() for p in ref.parameters())
    graphdef, state = nnx.split(abstract)
    out = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s)(ids), state,
                         jax.ShapeDtypeStruct((2, 128), np.int32))
    assert out[0].shape == (2, 128, 30522) and out[1].shape == (2, 2)
    hidden = jax.eval_shape(lambda s, ids: nnx.merge(graphdef, s).encode(nnx.merge(graphdef, s).embed(ids)),
                            state, jax.ShapeDtypeStruct((2, 128), np.int32))
    assert hidden.shape == (2, 128, config.hidden_size)


def test_hf_config_round_trip():
    hf = transformers.BertConfig(hidden_size=48, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96,
                                 num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    config = BertConfig.from_hf_config(hf)
    assert (config.hidden_size, config.num_attention_heads, config.labels) == (48, 4, ("neg", "pos"))
    back = config.to_hf_config()
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
                "layer_norm_eps", "hidden_act"):
        assert getattr(back, key) == getattr(hf, key)
    assert back.id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=100, num_attention_heads=3), "not divisible"),
    (dict(hidden_act="gelu_fast"), "hidden_act='gelu_fast'"),
    (dict(num_labels=0), "num_labels=0"),
    (dict(dtype="int8"), "dtype='int8'"),
    (dict(dropout_rng="philox"), "dropout_rng='philox': use 'hash' or 'threefry'"),
])
def test_config_errors_name_the_value(changes, message):
    with pytest.raises(ValueError, match=message):
        BertConfig.tiny(**changes)


def test_non_bert_config_rejected():
    with pytest.raises(ValueError, match="model_type='roberta'"):
        BertConfig.from_hf_config({"model_type": "roberta"})


def test_dropout_needs_explicit_key_and_is_reproducible():
    model = Bert(BertConfig.tiny(vocab_size=50), "base", rngs=nnx.Rngs(0))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    with pytest.raises(ValueError, match="dropout_key"):
        model(ids, deterministic=False)
    key = jax.random.key(3)
    a = np.asarray(model(ids, deterministic=False, dropout_key=key))
    b = np.asarray(model(ids, deterministic=False, dropout_key=key))
    c = np.asarray(model(ids, deterministic=False, dropout_key=jax.random.key(4)))
    clean = np.asarray(model(ids))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and not np.allclose(a, clean)


@pytest.mark.parametrize("rng", ["hash", "threefry"])
def test_dropout_masks_are_bernoulli_at_the_exact_rate_and_vmap_per_key(rng):
    """Closed-form references: the dropped count is Binomial(n, p) with p = round(rate * 2^16) / 2^16, kept
    values are x / (1 - p); neighbouring elements, rows and keys are uncorrelated (|r| < 5 / sqrt(n)); vmapped
    over keys, each key's own mask."""
    from jaxopt_llm.models.bert.modeling import dropout

    x = np.ones((64, 4096), np.float32)
    p = round(0.1 * 65536) / 65536
    keys = jax.random.split(jax.random.key(7), 3)
    out = [np.asarray(dropout(x, 0.1, k, False, rng)) for k in keys]
    n = x.size
    for y in out:
        assert abs((y == 0).sum() - n * p) < 5 * np.sqrt(n * p * (1 - p))
        np.testing.assert_array_equal(y[y != 0], np.float32(1.0) / np.float32(1 - p))
    kept = [(y != 0).astype(np.float64) for y in out]

    def corr(a, b):
        return np.corrcoef(a.ravel(), b.ravel())[0, 1]

    m = kept[0]
    for a, b in [(m[:, :-1], m[:, 1:]), (m[:, :-2], m[:, 2:]), (m[:-1], m[1:]), (kept[0], kept[1]), (kept[1], kept[2])]:
        assert abs(corr(a, b)) < 5 / np.sqrt(a.size)
    vmapped = np.asarray(jax.vmap(lambda k: dropout(x[:4], 0.1, k, False, rng))(keys))
    np.testing.assert_array_equal(vmapped, np.stack([y[:4] for y in out]))


def test_hash_bits_are_uniform_and_the_threefry_option_keeps_the_old_masks():
    """The 16-bit halves that masks compare against the threshold: chi-square over all 65,536 values within
    six standard deviations of its mean, every one of the 32 bit positions set half the time (5 sigma).
    `dropout_rng="threefry"` reproduces the masks written from `jax.random.bits` as the earlier default did."""
    from jaxopt_llm.models.bert.modeling import dropout, hash_bits

    words = np.asarray(hash_bits(jax.random.key(11), (1024, 2048)))
    halves = words.view(np.uint16).ravel()
    counts = np.bincount(halves, minlength=65536)
    expected = halves.size / 65536
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert abs(chi2 - 65535) < 6 * np.sqrt(2 * 65535)
    bits = (words.ravel()[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    assert np.all(np.abs(bits.mean(0) - 0.5) < 5 * 0.5 / np.sqrt(words.size))
    with pytest.raises(ValueError, match="exceed the 32-bit counter"):
        hash_bits(jax.random.key(0), (2**16, 2**16))
    with pytest.raises(ValueError, match="rng='philox'"):
        dropout(np.ones(3, np.float32), 0.1, jax.random.key(0), False, "philox")

    key, x = jax.random.key(5), np.ones((3, 7), np.float32)
    old = np.asarray(jax.random.bits(key, (3, 4), np.uint32)).view(np.uint16).reshape(3, 8)[:, :7]
    keep = old >= round(0.25 * 65536)
    np.testing.assert_array_equal(np.asarray(dropout(x, 0.25, key, False, "threefry")),
                                  np.where(keep, x / np.float32(0.75), 0))


def test_too_long_input_is_a_clear_error():
    model = Bert(BertConfig.tiny(vocab_size=50, max_position_embeddings=8), "base", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceeds the model.s 8 positions"):
        model(np.zeros((1, 9), np.int32))


def test_experiment_configs_load_and_start_with_their_command():
    import ast
    from pathlib import Path

    from jaxopt_llm import config as config_lib
    from jaxopt_llm import recipes

    files = sorted((Path(__file__).resolve().parents[1] / "experiments" / "configs").glob("*.py"))
    assert {f.stem for f in files} >= {"tweets_tiny", "sst2_base", "imdb_base", "mlm_tiny", "mlm_base",
                                       "tweets_adversarial_tiny", "tweets_distill_tiny"}
    for file in files:
        doc = ast.get_docstring(ast.parse(file.read_text()))
        command = next(line.strip() for line in doc.splitlines() if line.strip().startswith("jaxopt-llm"))
        assert f"--config experiments/configs/{file.name}" in command, file
        config = config_lib.load(file)
        method, task = recipes.commands()[command.split()[1]]
        assert method.name == config.method and task in (None, config.task), file


def test_experiment_pipelines_plan_with_every_stage_config_valid_and_start_with_their_command(tmp_path):
    import ast
    from pathlib import Path

    from jaxopt_llm import pipeline

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "experiments" / "pipelines").glob("*.py"))
    assert {f.stem for f in files} >= {"tweets", "tweets_base", "ner", "qa"}
    for file in files:
        doc = ast.get_docstring(ast.parse(file.read_text()))
        assert f"pipeline run experiments/pipelines/{file.name}" in doc.split("\n\n")[1], file
        loaded = pipeline.load(file)
        if not Path(loaded.data.source).is_file() and loaded.data.source.startswith("runs/"):
            # a generated source: the docstring's first command makes it (here into tmp_path)
            command = doc.split("\n\n")[1].strip().splitlines()[0].split()
            assert command[0] == "python" and command[2] == "--out", command
            out = tmp_path / "data" / file.stem
            subprocess.run([sys.executable, str(root / command[1]), "--out", str(out)], check=True,
                           capture_output=True)
            loaded = dataclasses.replace(loaded, data=dataclasses.replace(
                loaded.data, source=str(out / Path(loaded.data.source).name)))
        rows = pipeline.plan(loaded, tmp_path / file.stem)  # loads and checks each stage's config
        assert [r["action"] for r in rows] == ["run"] * len(rows) and not (tmp_path / file.stem).exists()


@pytest.mark.parametrize("items, message", [
    (["adversarial.enabled=true"], "method=adversarial"),
    (["adversarial.epsilon=0.1"], r"belong to method=adversarial.*set method=adversarial first"),
    (["method=adversarial", "adversarial.epsilon=-1"], "adversarial.epsilon=-1"),
    (["method=nope"], "method='nope' is not registered"),
    (["task=summarization"], "task='summarization'"),
    (["method=adversarial", "adversarial.stepz=3"], r"unknown config key 'adversarial.stepz'.*adversarial\.epsilon"),
    (["model.scan_unroll=true"], r"model.scan_unroll=True applies to scanned layers only: set model.scan_layers=true"),
    (["model.remat=full"], r"model.remat='full' applies to scanned layers only"),
    (["model.dropout_rng=philox"], r"model.dropout_rng='philox': use 'hash' or 'threefry'"),
])
def test_method_options_and_old_keys_get_one_clear_error(items, message):
    from jaxopt_llm import config as config_lib

    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(None, ["data.train_file=x.csv", *items])


def test_old_task_names_and_switching_methods():
    from jaxopt_llm import config as config_lib
    from jaxopt_llm.steps.adversarial import Adversary

    config = config_lib.load(None, ["data.train_file=x.csv", "task=pretrain", "method=adversarial",
                                    "adversarial.epsilon=0.5"])
    assert config.task == "masked-lm" and config.options == Adversary(epsilon=0.5)
    assert config.to_dict()["adversarial"]["epsilon"] == 0.5
    assert config_lib.override(config, ["method=adversarial"]).options.epsilon == 0.5  # same method: kept
    assert config_lib.override(config, ["method=clean"]).options.__class__.__name__ == "Clean"
