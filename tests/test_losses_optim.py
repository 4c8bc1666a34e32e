"""Losses against closed forms; the optimiser's schedule, decay mask, skipping and accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxopt_llm import losses, optim
from jaxopt_llm.config import TrainConfig


def test_cross_entropy_closed_form_and_mask():
    logits = jnp.array([[0.0, 0.0], [2.0, 0.0], [1e4, -1e4]])
    labels = jnp.array([1, 1, 0])
    expected = [np.log(2.0), np.log(1 + np.exp(2.0)), 0.0]
    np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6, atol=1e-6)
    masked = losses.cross_entropy(logits, labels, jnp.array([True, False, True]))
    np.testing.assert_allclose(masked, [np.log(2.0), 0.0, 0.0], atol=1e-6)
    total, count = losses.masked_sum(masked, jnp.array([True, False, True]))
    assert float(count) == 2 and np.isclose(float(total), np.log(2.0))


def test_cross_entropy_jit_equals_eager_and_bf16_inputs_use_float32():
    logits = jax.random.normal(jax.random.key(0), (4, 7)).astype(jnp.bfloat16)
    labels = jnp.array([0, 3, 6, 2])
    eager = losses.cross_entropy(logits, labels)
    assert eager.dtype == jnp.float32
    np.testing.assert_array_equal(jax.jit(losses.cross_entropy)(logits, labels), eager)


def test_gradients_finite_and_zero_where_masked():
    logits = jnp.array([[1e9, -1e9, 0.0], [0.5, 0.1, 0.2]])
    where = jnp.array([False, True])
    grads = jax.grad(lambda x: losses.masked_sum(losses.cross_entropy(x, jnp.array([1, 0]), where), where)[0])(logits)
    assert np.isfinite(np.asarray(grads)).all()
    np.testing.assert_array_equal(grads[0], 0.0)


def test_kl_zero_when_equal_and_closed_form():
    a = jnp.array([[1.0, 2.0, 3.0]])
    assert float(losses.kl_divergence(a, a + 5.0)[0]) == pytest.approx(0.0, abs=1e-6)
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    value = losses.kl_divergence(jnp.log(jnp.array([p])), jnp.log(jnp.array([q])))[0]
    assert float(value) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-5)


def test_schedule_warmup_then_linear_and_cosine():
    cfg = TrainConfig(learning_rate=1.0, warmup_steps=10, steps=110)
    lr = optim.schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(60)) == pytest.approx(0.5) and float(lr(110)) == pytest.approx(0.0)
    cos = optim.schedule(TrainConfig(learning_rate=1.0, warmup_steps=0, steps=100, decay="cosine"))
    assert float(cos(50)) == pytest.approx(0.5, abs=1e-6)


def test_decay_mask_excludes_biases_and_norm_scales():
    from flax import nnx

    from jaxopt_llm.models.bert import Bert, BertConfig

    params = nnx.state(Bert(BertConfig.tiny(vocab_size=50, num_hidden_layers=1), rngs=nnx.Rngs(0)), nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(optim.decay_mask(params))[0]
    flat = {".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): v for path, v in leaves}
    assert flat["layers.0.attention.qkv.kernel"] is True and flat["embeddings.word.embedding"] is True
    assert flat["layers.0.attention.qkv.bias"] is False and flat["embeddings.norm.scale"] is False


def test_nonfinite_update_is_skipped_and_counted():
    tx = optim.make(TrainConfig(learning_rate=0.1, warmup_steps=0, steps=10))
    params = {"w": jnp.ones(3)}
    opt = tx.init(params)
    updates, opt = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, opt, params)
    assert np.array_equal(np.asarray(optax.apply_updates(params, updates)["w"]), np.ones(3))
    assert int(optim.skipped_updates(opt)) == 1
    updates, opt = tx.update({"w": jnp.ones(3)}, opt, params)
    assert not np.array_equal(np.asarray(optax.apply_updates(params, updates)["w"]), np.ones(3))
    assert int(optim.skipped_updates(opt)) == 1


def test_clipped_adamw_equals_the_optax_chain_and_a_skipped_step_is_as_if_absent():
    """Reference: optax's clip_by_global_norm -> adamw(schedule, decay mask), fed the same steps minus the
    non-finite ones. Steps below and above the clipping norm, warmup, decayed and undecayed leaves."""
    cfg = TrainConfig(learning_rate=0.05, warmup_steps=2, steps=8, weight_decay=0.1, max_grad_norm=1.0)
    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optim.schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps, weight_decay=0.1,
                    mask=optim.decay_mask))
    keys = jax.random.split(jax.random.key(3), 4)
    params = {"dense": {"kernel": jax.random.normal(keys[0], (3, 4)), "bias": jnp.zeros(4)},
              "norm": {"scale": jnp.ones(4)}}
    def grads(i, scale):
        return jax.tree.map(lambda p, k: scale * jax.random.normal(k, p.shape), params,
                            {"dense": {"kernel": keys[i], "bias": keys[i + 1]}, "norm": {"scale": keys[i - 1]}})
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads(1, 1.0))
    steps = [grads(1, 0.05), grads(2, 10.0), bad, jax.tree.map(lambda g: g.at[0].set(jnp.inf), bad), grads(3, 0.3)]
    assert float(optax.tree.norm(steps[0])) < 1.0 < float(optax.tree.norm(steps[1]))
    tx = optim.make(cfg)
    ours, state = params, tx.init(params)
    assert jax.tree.structure(state.inner) == jax.tree.structure(reference.init(params))  # one checkpoint layout
    ref, ref_state = params, reference.init(params)
    update = jax.jit(tx.update)
    for g in steps:
        updates, state = update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        if all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g)):
            updates, ref_state = reference.update(g, ref_state, ref)
            ref = optax.apply_updates(ref, updates)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, ref)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), state.inner, ref_state)
    assert int(optim.skipped_updates(state)) == 2
    assert not np.array_equal(ours["dense"]["kernel"], params["dense"]["kernel"])


def test_accumulation_of_two_halves_equals_one_full_batch():
    """AdamW on mean gradients: 2 accumulated half batches == 1 full batch (equal halves)."""
    x = jax.random.normal(jax.random.key(0), (8, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5])
    loss = lambda p, xb, yb: jnp.mean((xb @ p["w"] - yb) ** 2)  # noqa: E731
    base = dict(learning_rate=0.1, warmup_steps=0, steps=10)
    params = {"w": jnp.zeros(3)}
    full = optim.make(TrainConfig(**base))
    updates, _ = full.update(jax.grad(loss)(params, x, y), full.init(params), params)
    expected = optax.apply_updates(params, updates)
    acc = optim.make(TrainConfig(**base, grad_accum=2))
    state, p = acc.init(params), params
    for half in (slice(0, 4), slice(4, 8)):
        updates, state = acc.update(jax.grad(loss)(p, x[half], y[half]), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p["w"], expected["w"], atol=1e-6)
