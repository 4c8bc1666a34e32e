"""Distillation: losses against closed forms, alpha = 0 is the classification step, the teacher is frozen and
gets no gradient, student construction, jit == pmap, and a full run through the loop."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hf_model, make_batch, run_backend, task_for
from flax import nnx

from jaxopt_llm import config as config_lib
from jaxopt_llm import losses
from jaxopt_llm import state as state_lib
from jaxopt_llm.models import bert
from jaxopt_llm.steps import clean
from jaxopt_llm.steps import distill as D
from jaxopt_llm.steps.common import mean_metrics

CLS = task_for("sequence-classification")


def kd_step(student_graphdef, teacher_graphdef, tx, kd, task=CLS):
    return D.make_train_step(student_graphdef, {"t": teacher_graphdef}, tx, kd, task)


def teachers(params):
    return {"teachers": {"t": params}}


def test_kl_zero_when_student_equals_teacher_and_alpha_zero_is_ce():
    logits = jax.random.normal(jax.random.key(0), (5, 3))
    labels = jnp.array([0, 1, 2, 1, 0])
    total, ce, kl = losses.distillation(logits, logits, labels, alpha=0.7, temperature=3.0)
    np.testing.assert_allclose(kl, 0.0, atol=1e-6)
    total0, ce0, _ = losses.distillation(logits, logits + 1.0, labels, alpha=0.0, temperature=3.0)
    np.testing.assert_array_equal(total0, losses.cross_entropy(logits, labels))


def test_temperature_squared_scaling_closed_form():
    s, t, T, alpha = np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]]), 2.0, 0.6
    p_t = np.exp(t / T) / np.exp(t / T).sum()
    p_s = np.exp(s / T) / np.exp(s / T).sum()
    kl = float(np.sum(p_t * np.log(p_t / p_s)))
    ce = float(np.log(np.exp(s).sum()) - s[0, 1])
    total, _, got_kl = losses.distillation(jnp.array(s), jnp.array(t), jnp.array([1]), alpha, T)
    assert float(got_kl[0]) == pytest.approx(kl, rel=1e-5)
    assert float(total[0]) == pytest.approx((1 - alpha) * ce + alpha * T**2 * kl, rel=1e-5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    hf_model("sequence-classification", num_hidden_layers=4, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0).save_pretrained(d)
    return d


def student_of(teacher, layers=2, init="teacher-layers", hidden=False, **changes):
    config = D.student_config(teacher.config, layers, **changes)
    return D.Student(D.init_student(teacher, config, init, seed=0), teacher.config.hidden_size, hidden,
                     rngs=nnx.Rngs(1))


def test_teacher_layers_init_takes_every_kth_layer(teacher_dir):
    teacher = bert.from_pretrained(teacher_dir, "sequence-classification")
    student = student_of(teacher).bert
    assert D.layer_map(2, 4) == [0, 2] and D.layer_map(3, 6) == [0, 2, 4]
    for i, j in enumerate([0, 2]):
        np.testing.assert_array_equal(student.layers[i].output.kernel[...], teacher.layers[j].output.kernel[...])
    np.testing.assert_array_equal(student.embeddings.word.embedding[...], teacher.embeddings.word.embedding[...])
    np.testing.assert_array_equal(student.classifier.kernel[...], teacher.classifier.kernel[...])
    random = student_of(teacher, init="random").bert
    assert not np.array_equal(random.layers[0].output.kernel[...], teacher.layers[0].output.kernel[...])
    with pytest.raises(ValueError, match="distill.init=random"):
        student_of(teacher, hidden_size=12, num_attention_heads=3, intermediate_size=20)


def test_alpha_zero_is_the_classification_step_to_the_last_bits(teacher_dir):
    """Compiled apart, as in test_adversarial's zero-step test: after one SGD step equal to float32 rounding
    (1e-8 absolute, 2e-6 relative), where a misaligned key or a teacher term would move parameters by 1e-4
    and more."""
    teacher = bert.from_pretrained(teacher_dir, "sequence-classification")
    student = student_of(teacher)
    s_graphdef, s_params = nnx.split(student)
    t_graphdef, t_params = nnx.split(teacher)
    b_graphdef, b_params = nnx.split(student.bert)
    tx = optax.sgd(0.1)
    batch, key = make_batch(), jax.random.key(2)
    step = kd_step(s_graphdef, t_graphdef, tx, D.Distillation(alpha=0.0))
    new, _ = jax.jit(step)(state_lib.create(s_params, tx), batch, key, teachers(t_params))
    ref, _ = jax.jit(clean.make_train_step(b_graphdef, tx, CLS))(state_lib.create(b_params, tx), batch, key)
    for a, b in zip(jax.tree.leaves(new.params["bert"]), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)


def test_teacher_frozen_and_gradients_reach_only_the_student(teacher_dir):
    teacher = bert.from_pretrained(teacher_dir, "sequence-classification")
    s_graphdef, s_params = nnx.split(student_of(teacher, hidden=True))
    t_graphdef, t_params = nnx.split(teacher)
    before = jax.tree.map(np.array, t_params)
    tx = optax.sgd(0.1)
    kd = D.Distillation(alpha=0.5, temperature=2.0, hidden_weight=1.0, attention_weight=1.0)
    step = kd_step(s_graphdef, t_graphdef, tx, kd)
    state = state_lib.create(jax.tree.map(jnp.copy, s_params), tx)
    new, metrics = jax.jit(step, donate_argnums=0)(state, make_batch(), jax.random.key(0), teachers(t_params))
    for a, b in zip(jax.tree.leaves(t_params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)  # bit-identical after the step
    means = mean_metrics(metrics)
    assert {"loss", "ce", "kl", "accuracy", "agreement", "hidden_mse", "attention_mse"} <= set(means)
    assert means["hidden_mse"] > 0 and means["attention_mse"] > 0

    def total(tp):
        _, m = step(state_lib.create(s_params, tx), make_batch(), jax.random.key(0), teachers(tp))
        return m["loss"][0]
    grads = jax.jit(jax.grad(total))(t_params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_different_width_student_with_projection_and_mlm(tmp_path):
    hf_model("masked-lm").save_pretrained(tmp_path)
    teacher = bert.from_pretrained(tmp_path, "masked-lm")
    student = student_of(teacher, layers=1, init="random", hidden=True, hidden_size=12, num_attention_heads=3,
                         intermediate_size=20)
    s_graphdef, s_params = nnx.split(student)
    t_graphdef, t_params = nnx.split(teacher)
    tx = optax.adam(1e-3)
    kd = D.Distillation(alpha=0.5, temperature=1.0, hidden_weight=0.5, attention_weight=0.5)
    step = jax.jit(kd_step(s_graphdef, t_graphdef, tx, kd, task_for("masked-lm")))
    state = state_lib.create(s_params, tx)
    losses_seen = []
    for _ in range(5):
        state, metrics = step(state, make_batch(), jax.random.key(0), teachers(t_params))
        losses_seen.append(mean_metrics(metrics)["loss"])
    assert student.projection.kernel[...].shape == (12, 24)
    assert losses_seen[-1] < losses_seen[0]  # same batch: the student moves towards the teacher


def run_kd(teacher_dir, backend, n, steps=2):
    teacher = bert.from_pretrained(teacher_dir, "sequence-classification")
    s_graphdef, s_params = nnx.split(student_of(teacher))
    t_graphdef, t_params = nnx.split(teacher)
    kd = D.Distillation(alpha=0.5, temperature=2.0)
    means, params, compiles = run_backend(lambda tx: kd_step(s_graphdef, t_graphdef, tx, kd), s_params, backend, n,
                                          steps, aux=teachers(t_params))
    return [m["loss"] for m in means], params, compiles


def test_jit_sharded_and_pmap_equal_single_device(teacher_dir):
    ref, ref_params, compiles = run_kd(teacher_dir, "jit", 1)
    assert compiles == [1, 0]
    for backend in ("jit", "pmap"):
        got, params, compiles = run_kd(teacher_dir, backend, 8)
        assert compiles[1:] == [0]
        np.testing.assert_allclose(got, ref, atol=1e-6)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_two_teachers_are_averaged_in_probability():
    a = jnp.array([[2.0, 0.0, -1.0]])
    b = jnp.array([[0.0, 1.0, 3.0]])
    combined = D.teacher_logits([a, b], temperature=2.0)
    expected = (jax.nn.softmax(a / 2.0) + jax.nn.softmax(b / 2.0)) / 2
    np.testing.assert_allclose(jax.nn.softmax(combined / 2.0), expected, atol=1e-6)
    np.testing.assert_array_equal(D.teacher_logits([a], 2.0), a)


def test_old_enabled_flag_names_the_new_key():
    with pytest.raises(config_lib.ConfigError, match="method=distill"):
        config_lib.load(None, ["data.train_file=x.csv", "distill.enabled=true"])


def test_distill_needs_a_teacher():
    with pytest.raises(config_lib.ConfigError, match="distill.teacher"):
        config_lib.load(None, ["data.train_file=x.csv", "method=distill"])
