"""Ensembles and calibration: the ensemble step against N single steps, calibration metrics against hand-computed
values, the temperature fit against a known temperature, stacked runs, and ensembles through the loop, the
CLI, prediction and distillation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hf_model, make_batch, overrides, task_for
from flax import nnx

from jaxopt_llm import calibration, cli, inference
from jaxopt_llm import config as config_lib
from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm import state as state_lib
from jaxopt_llm.models import bert
from jaxopt_llm.recipes import Context
from jaxopt_llm.steps import clean, ensemble
from jaxopt_llm.train import train

CLS = task_for("sequence-classification")


@pytest.mark.parametrize("per_pass", [1, 2, 3])  # one member at a time, 2 + the remaining 1, all vmapped
def test_the_ensemble_step_equals_single_member_steps(tmp_path, per_pass):
    hf_model("sequence-classification", hidden_dropout_prob=0.1).save_pretrained(tmp_path)  # dropout on
    # per-member clipping: a global norm over all members would couple them
    tx = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(0.5))
    members = 3
    ctx = Context(task=CLS, tx=tx, seed=0, model=str(tmp_path),
                  load=lambda ref, head=None, seed=0: bert.from_pretrained(ref, "sequence-classification", seed=seed))
    recipe = ensemble.build(ctx, ensemble.EnsembleOptions(members=members, members_per_pass=per_pass))
    step = jax.jit(recipe.train_step)
    state = state_lib.create(recipe.params, recipe.tx)
    key = jax.random.key_data(jax.random.key(5))
    singles = [state_lib.create(jax.tree.map(lambda x: x[i], recipe.params), tx) for i in range(members)]
    single_step = jax.jit(clean.make_train_step(recipe.graphdef, tx, CLS))
    for position in range(2):
        batches = [make_batch(10 * i + position) for i in range(members)]  # each member its own batch
        state, _ = step(state, {k: np.stack([b[k] for b in batches]) for k in batches[0]}, key, None)
        singles = [single_step(s, b, ensemble.member_key(key, i))[0] for i, (s, b) in enumerate(zip(singles, batches))]
    for i, single in enumerate(singles):
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], state.params)), jax.tree.leaves(single.params)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    heads = [np.asarray(single.params["classifier"]["kernel"][...]) for single in singles]
    assert not np.allclose(heads[0], heads[1])  # fresh heads from each member's seed
    with pytest.raises(ValueError,
                       match=r"ensemble.members_per_pass=4: use 0 \(automatic\) or 1 .. ensemble.members=3"):
        ensemble.EnsembleOptions(members=3, members_per_pass=4)


def test_calibration_metrics_by_hand():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    got = metrics_lib.classification(probs, labels)
    # confidences 0.9, 0.6, 0.7, 0.55 (correct 1, 0, 1, 1) in bins of width 1/15: (13/15, 14/15] holds 0.9,
    # (8/15, 9/15] holds 0.6 and 0.55, (10/15, 11/15] holds 0.7; ECE = sum over bins |correct - confidence| / n
    ece = (abs(1 - 0.9) + abs((0 + 1) - (0.6 + 0.55)) + abs(1 - 0.7)) / 4
    nll = -(np.log(0.9) + np.log(0.4) + np.log(0.7) + np.log(0.55)) / 4
    brier = ((0.1 ** 2 * 2) + (0.6 ** 2 * 2) + (0.3 ** 2 * 2) + (0.45 ** 2 * 2)) / 4
    assert {k: got[k] for k in ("accuracy", "nll", "ece", "brier")} == pytest.approx(
        {"accuracy": 0.75, "nll": nll, "ece": ece, "brier": brier}, abs=1e-6)
    assert got["confusion"] == [[2, 0], [1, 1]]  # [true, predicted]
    assert got["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2, abs=1e-12)
    # two examples in one bin: |mean correct - mean confidence| weighted by the bin's share
    same_bin = metrics_lib.classification(np.array([[0.62, 0.38], [0.64, 0.36]]), np.array([0, 1]))
    assert same_bin["ece"] == pytest.approx(abs(0.5 - 0.63), abs=1e-6)


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20000, 4)) * 3
    true_t = 2.5
    p = np.exp(logits / true_t)
    p /= p.sum(-1, keepdims=True)
    labels = np.array([rng.choice(4, p=row) for row in p])  # labels drawn from softmax(logits / 2.5)
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    items = overrides(setup, **{"train.steps": 2, "train.log_every": 1})
    train(config_lib.load(None, [*items, "method=ensemble", "ensemble.members=2"]), root / "ens")
    train(config_lib.load(None, items), root / "single")
    return root


def test_an_ensemble_run_trains_in_one_step_and_reports_member_statistics(runs):
    record = json.loads((runs / "ens" / "run.json").read_text())
    assert record["method"] == "ensemble" and record["train_step_compiles"] == 1
    assert [p.name for p in sorted((runs / "ens" / "members").iterdir())] == ["0", "1"]
    last = [json.loads(line) for line in (runs / "ens" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"accuracy", "f1", "loss", "ece", "brier", "disagreement", "mutual_information", "member_accuracy_mean",
            "member_accuracy_std"} <= set(last)


@pytest.mark.parametrize("per_pass", [1, 2])
def test_members_sharded_over_two_devices_train_as_on_one(runs, setup, tmp_path, per_pass):
    """Two members over two devices (each device trains one member), in sequence or vmapped: the losses the
    one-device run logged."""
    items = overrides(setup, devices=2, **{"train.steps": 2, "train.log_every": 1})
    train(config_lib.load(None, [*items, "method=ensemble", "ensemble.members=2",
                                 f"ensemble.members_per_pass={per_pass}"]), tmp_path / "ens")

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["split"] == "train"]

    assert json.loads((tmp_path / "ens" / "run.json").read_text())["device_count"] == 2
    assert losses(tmp_path / "ens") == pytest.approx(losses(runs / "ens"), abs=1e-5)


def test_ensemble_prediction_combines_members_and_from_runs_of_one_run_is_that_run(runs, capsys):
    texts = ["love it", "hate it", "it is a phone"]
    ens = inference.load(runs / "ens")
    assert ens.kind == "ensemble" and ens.engine.members == 2
    members = ens.member_probs(texts)
    one = [inference.load(runs / "ens" / "members" / str(i)).classify(texts) for i in range(2)]
    np.testing.assert_allclose(members, [[r["scores"] for r in m] for m in one], atol=1e-6)
    np.testing.assert_allclose([r["scores"] for r in ens.classify(texts)], members.mean(0), atol=1e-6)
    vote = inference.ensemble([runs / "ens" / "members" / "0", runs / "ens" / "members" / "1"],
                              combine="vote").classify(texts)
    assert all(sum(r["scores"]) == pytest.approx(1.0) for r in vote)
    alone = inference.ensemble([runs / "single"]).classify(texts)
    np.testing.assert_allclose([r["scores"] for r in alone],
                               [r["scores"] for r in inference.load(runs / "single").classify(texts)],
                               atol=1e-6)
    capsys.readouterr()
    cli.main(["predict", "classify", "--model", str(runs / "ens"), *texts])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([r["scores"] for r in rows], members.mean(0), atol=1e-6)


def test_members_of_another_architecture_or_label_set_are_one_clear_error(runs, setup, tmp_path, capsys):
    lines = (setup / "tweets.csv").read_text().splitlines(keepends=True)
    short = {"negative,": "neg,", "neutral,": "neu,", "positive,": "pos,"}
    (tmp_path / "renamed.csv").write_text("".join(
        next((short[k] + line[len(k):] for k in short if line.startswith(k)), line) for line in lines))
    train(config_lib.load(None, overrides(setup, **{"train.steps": 1, "data.train_file": tmp_path / "renamed.csv"})),
          tmp_path / "other_labels")
    with pytest.raises(ValueError, match=r"other_labels' has labels .* members of one ensemble share one label set"):
        inference.ensemble([runs / "single", tmp_path / "other_labels"])
    hf_model("sequence-classification", num_hidden_layers=1, vocab_size=30522).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="differ in architecture"):
        inference.ensemble([runs / "single", tmp_path / "small"])
    message = None
    with pytest.raises(SystemExit):
        cli.main(["stack", "--out", str(tmp_path / "bad"), str(runs / "single"), str(tmp_path / "small")])
    message = capsys.readouterr().err
    assert "differ in architecture" in message and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", ["single", "ens"])
def test_calibrate_writes_a_temperature_that_prediction_applies(runs, setup, capsys, name):
    run = runs / name
    before = inference.load(run).classify(["good", "bad"])
    capsys.readouterr()
    cli.main(["calibrate", "--model", str(run), "--data", str(setup / "tweets.csv"), "data.label_column=sentiment",
              "data.max_length=32"])
    record = json.loads((run / "temperature.json").read_text())
    assert record["after"]["nll"] <= record["before"]["nll"] + 1e-9 and (run / "reliability.png").is_file()
    assert record["after"]["accuracy"] == record["before"]["accuracy"]  # temperature never changes the class
    after = inference.load(run).classify(["good", "bad"])
    t = record["temperature"]
    for b, a in zip(before, after):
        expected = np.exp(np.log(b["scores"]) / t)
        np.testing.assert_allclose(a["scores"], expected / expected.sum(), atol=1e-5)
    (run / "temperature.json").unlink()


def test_an_ensemble_teaches_a_student_its_mean_distribution(runs, setup, tmp_path):
    config = config_lib.load(None, [*overrides(setup, **{"train.steps": 2, "train.log_every": 1}), "method=distill",
                                    f"distill.teacher={runs / 'ens'}", "distill.student_layers=1"])
    train(config, tmp_path / "kd")
    from jaxopt_llm.steps.distill import Distillation

    assert len(Distillation(teacher=str(runs / "ens")).teachers) == 2
    student = bert.from_pretrained(tmp_path / "kd", "sequence-classification")
    assert student.config.num_hidden_layers == 1 and student.config.labels == ("negative", "neutral", "positive")


def test_combine_rules():
    logits = jnp.log(jnp.array([[[0.7, 0.3]], [[0.2, 0.8]], [[0.6, 0.4]]]))
    np.testing.assert_allclose(ensemble.combine(logits, "mean-prob"), [[0.5, 0.5]], atol=1e-6)
    np.testing.assert_allclose(ensemble.combine(logits, "vote"), [[2 / 3, 1 / 3]], atol=1e-6)
    mean_logit = jax.nn.softmax(jnp.mean(logits, 0))
    np.testing.assert_allclose(ensemble.combine(logits, "mean-logit"), mean_logit, atol=1e-6)
    u = ensemble.uncertainty(logits)
    h = lambda p: -np.sum(p * np.log(p))  # noqa: E731
    assert float(u["mutual_information"][0]) == pytest.approx(h([0.5, 0.5]) - np.mean(
        [h([0.7, 0.3]), h([0.2, 0.8]), h([0.6, 0.4])]), abs=1e-5)
    assert float(u["disagreement"][0]) == pytest.approx(1 / 3)  # argmax of the mean (a tie: class 0) vs members


def test_nnx_state_of_a_stacked_ensemble_has_the_member_axis(runs):
    ens = inference.load(runs / "ens").engine
    assert jax.tree.leaves(ens.state)[0].shape[0] == 2
    assert isinstance(nnx.merge(ens.graphdef, jax.tree.map(lambda x: x[1], ens.state)), bert.Bert)


def test_an_ensemble_run_exports_with_its_member_axis(runs, tmp_path):
    from jaxopt_llm.export import export
    from jaxopt_llm.serving.artifact import Artifact

    texts = ["love it", "hate it", "it is a phone"]
    export(str(runs / "ens"), tmp_path / "art", golden_texts=texts, format="onnx")
    art = Artifact.load(tmp_path / "art")
    assert art.manifest["kind"] == "ensemble" and art.manifest["members"] == 2
    assert (tmp_path / "art" / "hf" / "members" / "1" / "config.json").is_file()
    expected = [r["scores"] for r in inference.load(runs / "ens").classify(texts)]
    np.testing.assert_allclose(art.predict(texts)[0], expected, atol=1e-5)
    onnx = Artifact.load(tmp_path / "art", backend="onnxruntime")  # the member axis inside one ONNX graph
    np.testing.assert_allclose(onnx.predict(texts)[0], expected, atol=1e-5)
