"""The training loop: logs, run record, one compile, clear errors before compiling, exact resume from an
earlier checkpoint. (SIGKILL and SIGTERM resume bit-identical to an uninterrupted run, and two jax.distributed
processes == one: tests/test_cloud.py, on a bucket.)"""

import dataclasses
import json

import numpy as np
import pytest
from conftest import overrides, records

from jaxopt_llm import config as config_lib
from jaxopt_llm.models import bert
from jaxopt_llm.parallel import compile_count
from jaxopt_llm.train import train


def test_finetune_logs_records_compiles_once_and_exports(setup, tmp_path):
    config = config_lib.load(None, overrides(setup, devices=None))  # all 8 devices
    metrics = train(config, tmp_path)
    assert set(metrics) == {"loss", "accuracy", "f1", "ece", "brier"} and 0 <= metrics["f1"] <= 1
    assert [r["step"] for r in records(tmp_path, "train")] == [2, 4, 6]
    assert [r["step"] for r in records(tmp_path, "eval")] == [3, 6]
    assert records(tmp_path, "eval")[-1]["accuracy"] == metrics["accuracy"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["train_step_compiles"] == 1
    assert run["device_count"] == 8 and run["config"]["train"]["batch_size"] == 8
    assert set(run["versions"]) >= {"jax", "flax", "optax", "transformers"} and "device_kind" in run
    assert run["label_names"] == ["negative", "neutral", "positive"]
    assert run["task"] == "classification" and run["method"] == "clean"
    assert 0 < run["baseline"]["majority_class_accuracy"] < 1
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    exported = bert.from_pretrained(tmp_path / "model", "sequence-classification")
    assert exported.config.labels == ("negative", "neutral", "positive")


def test_pretrain_mlm_with_nsp_and_whole_words(setup, tmp_path):
    config = config_lib.load(None, overrides(setup, **{"task": "masked-lm", "data.train_file": setup / "lines.txt",
                                                       "data.next_sentence": True, "data.whole_word_masking": True,
                                                       "train.steps": 4}))
    metrics = train(config, tmp_path)
    assert {"loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"} <= set(metrics)
    assert np.isfinite(metrics["loss"]) and json.loads((tmp_path / "run.json").read_text())["train_step_compiles"] == 1
    # the MLM loss starts near log(vocab) for a random model
    assert abs(records(tmp_path, "train")[0]["mlm_loss"] - np.log(30522)) < 1.0


@pytest.mark.parametrize("extra, message", [
    ({"train.batch_size": 12}, "train.batch_size=12 is not divisible by the 8 devices"),
    ({"data.label_column": "label"}, "no column 'label'"),
    ({"model.num_labels": 2}, "the data has 3 labels"),
    ({"data.train_file": "EMPTY"}, "has no rows"),
    ({"parallel.devices": 9}, "parallel.devices=9: this machine has 8 devices"),
])
def test_bad_input_stops_before_compiling(setup, tmp_path, extra, message):
    if extra.get("data.train_file") == "EMPTY":
        (tmp_path / "empty.csv").write_text("sentiment,text\n")
        extra = {"data.train_file": tmp_path / "empty.csv"}
    config = config_lib.load(None, overrides(setup, devices=None, **extra))
    before = compile_count()
    with pytest.raises(ValueError, match=message):
        train(config, tmp_path / "run")
    assert compile_count() == before


def test_unknown_config_key_lists_valid_keys():
    with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'train.stepz'.*train\.steps"):
        config_lib.load(None, ["train.stepz=3", "data.dataset=x"])


def test_majority_baseline_closed_form():
    from jaxopt_llm.steps.classify import ClassificationTask

    got = ClassificationTask().baseline({"labels": np.array([0, 1, 1, 2])}, {"labels": np.array([1, 0, 1, 1])})
    assert got == {"majority_class_accuracy": 0.75}


def test_pmap_resume_from_an_earlier_checkpoint_is_exact(setup, tmp_path):
    import shutil

    config = config_lib.load(None, overrides(setup, devices=2, **{"parallel.backend": "pmap", "train.steps": 4,
                                                       "train.log_every": 1, "train.checkpoint_every": 2,
                                                       "train.eval_every": 4}))
    train(config, tmp_path / "straight")
    train(config, tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")  # as if the process died before step 4 was saved
    train(config, tmp_path / "resumed")
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run["resumed_from"] == 2 and run["train_step_compiles"] == 1
    assert records(tmp_path / "resumed", "train") == records(tmp_path / "straight", "train")
    assert records(tmp_path / "resumed", "eval") == records(tmp_path / "straight", "eval")


def test_adversarial_run_compiles_once_then_sweep_cli(setup, tmp_path, capsys):
    from jaxopt_llm import cli

    config = config_lib.load(None, overrides(setup, **{"method": "adversarial", "adversarial.method": "pgd",
                                                       "adversarial.norm": "l2", "adversarial.epsilon": 0.5,
                                                       "adversarial.inner_steps": 2, "train.steps": 4}))
    train(config, tmp_path / "run")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train_step_compiles"] == 1 and run["method"] == "adversarial"
    assert run["config"]["adversarial"]["epsilon"] == 0.5
    logged = records(tmp_path / "run", "train")[-1]
    assert {"clean_loss", "adv_loss", "delta_norm", "adv_accuracy"} <= set(logged)
    assert logged["delta_norm"] == pytest.approx(0.5, rel=1e-3)
    plot = tmp_path / "robustness.png"
    cli.main(["sweep", "robustness", "--model", str(tmp_path / "run"), "--data", str(setup / "tweets.csv"),
              "--pgd-steps", "2", "--plot", str(plot), "eps=0,0.5,5", "data.label_column=sentiment",
              "data.max_length=32", "data.max_eval_examples=24"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = result["tables"][str(tmp_path / "run")]
    assert [r["epsilon"] for r in rows] == [0.0, 0.5, 5.0] and all(r["n"] == 24 for r in rows)
    assert rows[0]["accuracy"] >= rows[-1]["accuracy"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_distill_run_from_a_finetune_run(setup, tmp_path):
    train(config_lib.load(None, overrides(setup, **{"train.steps": 2})), tmp_path / "teacher")
    config = config_lib.load(None, overrides(setup, **{"method": "distill", "distill.teacher": tmp_path / "teacher",
                                                       "distill.student_layers": 1, "distill.hidden_weight": 0.1,
                                                       "train.steps": 3, "train.log_every": 1}))
    metrics = train(config, tmp_path / "student")
    run = json.loads((tmp_path / "student" / "run.json").read_text())
    assert run["train_step_compiles"] == 1
    assert {"loss", "ce", "kl", "accuracy", "agreement", "hidden_mse"} <= set(records(tmp_path / "student", "train")[0])
    assert {"loss", "accuracy", "f1"} <= set(metrics)
    student = bert.from_pretrained(tmp_path / "student" / "model", "sequence-classification")
    assert student.config.num_hidden_layers == 1 and student.config.labels == ("negative", "neutral", "positive")
    # the checkpoint holds the student (1 layer + projection) and nothing of the teacher's 2 layers
    meta = json.loads(next((tmp_path / "student" / "checkpoints").glob("*/state/_METADATA")).read_text())
    param_paths = [k for k in meta["tree_metadata"] if k.startswith("('params'")]
    assert any("'projection'" in k for k in param_paths) and not any("'layers', '1'" in k for k in param_paths)
    assert all(k.startswith(("('params', 'bert'", "('params', 'projection'")) for k in param_paths)


# ---- a method registered from outside the package trains through the loop and the CLI ---------------


@dataclasses.dataclass(frozen=True)
class LabelSmoothing:
    smoothing: float = 0.1


def label_smoothing_build(ctx, options):
    """Cross-entropy against (1 - s) one-hot + s uniform targets: a method written only against the seam."""
    import jax
    import optax
    from flax import nnx

    from jaxopt_llm import Recipe
    from jaxopt_llm.parallel import global_mean, global_sum
    from jaxopt_llm.steps.clean import make_eval_step
    from jaxopt_llm.steps.common import apply_gradients, step_key

    graphdef, params = nnx.split(ctx.load(ctx.model))
    task = ctx.task

    def loss_fn(p, batch, prepared):
        model = nnx.merge(graphdef, p)
        out = task.forward(model, model.embed(prepared.input_ids), batch, prepared.extra, deterministic=False,
                           dropout_key=prepared.dropout_key)
        t = task.targets(out, batch, prepared.extra)
        targets = optax.smooth_labels(jax.nn.one_hot(t.labels, t.logits.shape[-1]), options.smoothing)
        per_example = jax.numpy.where(t.where, optax.softmax_cross_entropy(t.logits, targets), 0.0)
        total, count = per_example.sum(), t.where.sum().astype("float32")
        return global_mean(total, count), {"loss": (total, count)}

    def train_step(state, batch, key, aux):
        prepared = task.prepare(batch, step_key(key, state.step))
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, prepared)
        return apply_gradients(state, global_sum(grads), ctx.tx), global_sum(metrics)

    return Recipe(task=task, tx=ctx.tx, graphdef=graphdef, params=params, train_step=train_step,
                  eval_step=make_eval_step(graphdef, task), export=lambda p: nnx.merge(graphdef, p))


def test_a_toy_method_registered_in_a_test_trains_through_loop_and_cli(setup, tmp_path, capsys, monkeypatch):
    import jaxopt_llm as jl
    from jaxopt_llm import cli, recipes

    # the registry is process-wide: the toy method leaves with this test, so later tests see the package's own
    monkeypatch.setattr(recipes, "_METHODS", dict(recipes._METHODS))
    jl.register(jl.Method("label-smoothing", LabelSmoothing, label_smoothing_build, help="label smoothing"))
    # smoothing 0 is plain cross-entropy: the logged losses must be the clean fine-tune's
    items = overrides(setup, **{"train.log_every": 1, "train.steps": 4})
    cli.main(["label-smoothing", "--workdir", str(tmp_path / "toy"), *items, "label-smoothing.smoothing=0"])
    cli.main(["finetune", "--workdir", str(tmp_path / "clean"), *items])
    toy, ref = records(tmp_path / "toy", "train"), records(tmp_path / "clean", "train")
    assert [r["step"] for r in toy] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in toy], [r["loss"] for r in ref], rtol=1e-6)
    run = json.loads((tmp_path / "toy" / "run.json").read_text())
    assert run["method"] == "label-smoothing" and run["train_step_compiles"] == 1
    assert run["config"]["label-smoothing"] == {"smoothing": 0.0}
    # a real smoothing trains too, and the exported model classifies through a run folder reference
    config = config_lib.load(None, ["method=label-smoothing", *items, "label-smoothing.smoothing=0.2"])
    train(config, tmp_path / "toy2")
    capsys.readouterr()
    cli.main(["predict", "classify", "--model", str(tmp_path / "toy2"), "a tweet"])
    assert json.loads(capsys.readouterr().out)["label"] in ("negative", "neutral", "positive")


def test_a_run_folder_is_accepted_wherever_a_model_is(setup, tmp_path, capsys):
    from jaxopt_llm import cli, inference

    train(config_lib.load(None, overrides(setup, **{"train.steps": 2})), tmp_path / "first")
    # as the starting model of another run: its head and label ids are kept
    train(config_lib.load(None, overrides(setup, **{"train.steps": 2, "model.name_or_path": tmp_path / "first"})),
          tmp_path / "second")
    assert json.loads((tmp_path / "second" / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    first = bert.from_pretrained(tmp_path / "first", "sequence-classification")  # the Python API
    ids = np.array([[101, 2204, 102]], np.int32)
    np.testing.assert_array_equal(np.asarray(first(ids)),
                                  np.asarray(bert.from_pretrained(tmp_path / "first" / "model",
                                                                  "sequence-classification")(ids)))
    model = inference.load(tmp_path / "second")  # the head the run was trained for
    assert model.kind == "classifier" and model.engine.model.task == "sequence-classification"
    assert model.max_length == 32  # the run's data.max_length, not the model's 64 positions
    cli.main(["similarity", "--model", str(tmp_path / "second"), "one text", "another text"])
    assert "closest to sentence 0" in capsys.readouterr().out
