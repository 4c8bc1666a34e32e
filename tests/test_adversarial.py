"""Adversarial training: the inner loop stays in the ball, ascends, leaves params alone; the outer update is
the gradient at embeddings + stop_gradient(delta); K = 0 is the clean step; the vmapped epsilon sweep equals
a loop; jit == pmap on 8 fake devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import hf_model, make_batch, run_backend, task_for
from flax import nnx

from jaxopt_llm import robustness
from jaxopt_llm import state as state_lib
from jaxopt_llm.models import bert
from jaxopt_llm.parallel import compile_count
from jaxopt_llm.steps import adversarial as A
from jaxopt_llm.steps import clean
from jaxopt_llm.steps.common import mean_metrics

CLS = task_for("sequence-classification")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    out = {}
    for task, drop in (("sequence-classification", 0.1), ("masked-lm", 0.1), ("nodrop", 0.0)):
        d = tmp_path_factory.mktemp(task)
        hf_model("masked-lm" if task == "masked-lm" else "sequence-classification", hidden_dropout_prob=drop,
                 attention_probs_dropout_prob=drop).save_pretrained(d)
        out[task] = d
    return out


def loss_objective(graphdef, batch):
    def objective(p, delta):
        model = nnx.merge(graphdef, p)
        logits = CLS.forward(model, model.embed(batch["input_ids"]) + delta, batch, None)
        return CLS.loss(logits, batch, None)[0]
    return objective


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("init", ["zero", "uniform"])
def test_inner_loop_stays_in_ball_zero_on_padding_and_ascends(dirs, norm, init):
    graphdef, params = nnx.split(bert.from_pretrained(dirs["nodrop"], "sequence-classification"))
    batch = make_batch()
    eps = 0.3
    adv = A.Adversary(norm=norm, epsilon=eps, inner_steps=4, init=init)
    objective = loss_objective(graphdef, batch)
    found = jax.jit(lambda p: A.attack(objective, p, (16, 12, 24), batch["attention_mask"], adv,
                                       jax.random.key(0)))(params)
    norms = np.asarray(found.norms)
    assert norms.shape == (4, 16) and (norms <= eps * (1 + 1e-5)).all()  # after every inner step
    assert (norms[-1] > 0.5 * eps).all()  # and it does move
    delta = np.asarray(found.delta)
    assert (delta[batch["attention_mask"] == 0] == 0).all()
    clean = float(jax.jit(objective)(params, jnp.zeros_like(found.delta)))
    assert float(jax.jit(objective)(params, found.delta)) > clean + 0.05


def test_inner_loop_sends_no_gradient_to_params(dirs):
    graphdef, params = nnx.split(bert.from_pretrained(dirs["nodrop"], "sequence-classification"))
    batch = make_batch()
    adv = A.Adversary(norm="l2", epsilon=0.3, inner_steps=2)
    objective = loss_objective(graphdef, batch)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(A.attack(objective, p, (16, 12, 24), batch["attention_mask"], adv,
                                                        jax.random.key(0)).delta ** 2)))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_outer_update_is_the_gradient_at_the_found_perturbation(dirs):
    graphdef, params = nnx.split(bert.from_pretrained(dirs["nodrop"], "sequence-classification"))
    batch = make_batch()
    adv = A.Adversary(norm="l2", epsilon=0.3, inner_steps=3)
    tx = optax.sgd(0.5)
    step = A.make_train_step(graphdef, tx, adv, CLS)
    state = state_lib.create(params, tx)
    key = jax.random.key(7)
    new, metrics = jax.jit(step)(state, batch, key)
    # the reference: find delta with the same key stream, then plain SGD on L(embed + delta) with delta fixed
    # (one jitted program: eager, every primitive of the backward pass would compile on its own)
    @jax.jit
    def reference(params):
        sk = jax.random.fold_in(key, 0)
        found = A.attack(loss_objective(graphdef, batch), params, (16, 12, 24), batch["attention_mask"], adv,
                         jax.random.fold_in(sk, 1))
        grads = jax.grad(loss_objective(graphdef, batch))(params, found.delta)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    expected = reference(params)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    means = mean_metrics(metrics)
    assert means["adv_loss"] > means["clean_loss"] and means["delta_norm"] == pytest.approx(0.3, rel=1e-4)


@pytest.mark.parametrize("task", ["sequence-classification", "masked-lm"])
def test_zero_steps_is_the_clean_step_to_the_last_bits(dirs, task):
    """Two programs compiled apart (XLA may fuse and round them differently): the parameters after one SGD
    step agree to float32 rounding (1e-8 absolute, 2e-6 relative). A misaligned dropout key or a stray
    perturbation changes the gradient itself, moving parameters by 1e-4 and more at this learning rate. (SGD,
    not Adam: Adam scales the rounding noise of a zero gradient, the key bias's, up to a step's size.)"""
    graphdef, params = nnx.split(bert.from_pretrained(dirs[task], task))  # dropout on: keys must line up
    tx = optax.sgd(0.1)
    batch = make_batch()
    key = jax.random.key(3)
    step_clean = clean.make_train_step(graphdef, tx, task_for(task))
    adv = A.make_train_step(graphdef, tx, A.Adversary(epsilon=0.1, inner_steps=0), task_for(task))
    a, ma = jax.jit(step_clean)(state_lib.create(params, tx), batch, key)
    b, mb = jax.jit(adv)(state_lib.create(params, tx), batch, key)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-8)
    assert mean_metrics(ma)["loss"] == pytest.approx(mean_metrics(mb)["loss"], rel=1e-6)


# ---- FreeLB and SMART against references written from scratch: a plain loop of jax.grad calls -------


def reference_logits(graphdef, params, batch, delta):
    """Class logits at embeddings + delta, through the full encoder (not the step's [CLS]-only last layer)."""
    model = nnx.merge(graphdef, params)
    hidden = model.encode(model.embed(batch["input_ids"]) + delta, batch["attention_mask"], batch["token_type_ids"])
    return model.classify_logits(hidden)


def reference_ce(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def reference_sym_kl(a, b):
    la, lb = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
    return jnp.sum(jnp.exp(la) * (la - lb) + jnp.exp(lb) * (lb - la), axis=-1)


def linf_step(delta, g, lr, eps, mask):
    return jnp.clip((delta + lr * jnp.sign(g)) * mask[..., None], -eps, eps)


def test_freelb_equals_a_hand_written_loop(dirs):
    graphdef, params = nnx.split(bert.from_pretrained(dirs["nodrop"], "sequence-classification"))
    batch = jax.device_put(make_batch())
    eps, k, w, lr = 0.05, 3, 0.5, 0.5
    adv = A.Adversary(method="freelb", norm="linf", epsilon=eps, inner_steps=k, init="zero", clean_weight=w)
    tx = optax.sgd(lr)
    new, metrics = jax.jit(A.make_train_step(graphdef, tx, adv, CLS))(state_lib.create(params, tx), batch,
                                                                      jax.random.key(0))

    def loss(p, delta):
        return reference_ce(reference_logits(graphdef, p, batch, delta), batch["labels"])

    @jax.jit  # the loop unrolled into one program
    def reference(params):
        delta = jnp.zeros((16, 12, 24))
        grads = jax.tree.map(lambda g: w * g, jax.grad(loss)(params, delta))
        values = []
        for _ in range(k):  # FreeLB: parameter gradients of every ascent step, averaged
            value, (g_params, g_delta) = jax.value_and_grad(loss, argnums=(0, 1))(params, delta)
            grads = jax.tree.map(lambda a, g: a + g / k, grads, g_params)
            values.append(value)
            delta = linf_step(delta, g_delta, 2.5 * eps / k, eps, batch["attention_mask"])
        expected = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        return expected, jnp.stack(values), loss(params, jnp.zeros((16, 12, 24)))

    expected, values, clean_loss = reference(params)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert mean_metrics(metrics)["loss"] == pytest.approx(w * float(clean_loss) + float(np.mean(values)), rel=1e-5)


def test_smart_equals_a_hand_written_loop(dirs):
    graphdef, params = nnx.split(bert.from_pretrained(dirs["nodrop"], "sequence-classification"))
    batch = jax.device_put(make_batch())
    eps, k, lam, lr = 0.05, 2, 2.0, 0.5
    adv = A.Adversary(method="smart", norm="linf", epsilon=eps, inner_steps=k, init="uniform", smart_weight=lam)
    tx = optax.sgd(lr)
    key = jax.random.key(4)
    new, metrics = jax.jit(A.make_train_step(graphdef, tx, adv, CLS))(state_lib.create(params, tx), batch, key)

    @jax.jit  # the loop unrolled into one program
    def reference(params):
        # delta starts uniform in the L-inf ball on real tokens, from fold_in(step key, 1); step 0
        start_key = jax.random.fold_in(jax.random.fold_in(key, 0), 1)
        delta = jax.random.uniform(start_key, (16, 12, 24), minval=-1.0, maxval=1.0) * eps
        delta = delta * batch["attention_mask"][..., None]
        clean = jax.lax.stop_gradient(reference_logits(graphdef, params, batch, 0.0))
        for _ in range(k):  # ascend the symmetric KL to the clean prediction, parameters fixed
            g = jax.grad(lambda d: jnp.sum(reference_sym_kl(clean, reference_logits(graphdef, params, batch, d))))(delta)
            delta = linf_step(delta, g, 2.5 * eps / k, eps, batch["attention_mask"])

        def loss(p):
            c = reference_logits(graphdef, p, batch, 0.0)
            a = reference_logits(graphdef, p, batch, delta)
            return reference_ce(c, batch["labels"]) + lam * jnp.mean(reference_sym_kl(c, a))

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - lr * g, params, grads)

    value, expected = reference(params)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert mean_metrics(metrics)["loss"] == pytest.approx(float(value), rel=1e-5)


def test_smart_with_zero_start_is_refused():
    with pytest.raises(ValueError, match="init=uniform"):
        A.Adversary(method="smart", init="zero")


def test_vmapped_epsilon_sweep_equals_a_loop(dirs):
    from jaxopt_llm import sweep

    model = bert.from_pretrained(dirs["nodrop"], "sequence-classification")
    graphdef, params = nnx.split(model)
    batch = jax.device_put(make_batch())
    adv = A.Adversary(norm="linf", epsilon=0.0, inner_steps=3)
    eps = [0.0, 0.05, 0.2, 1.0]
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], params)
    before = compile_count()
    sums = jax.device_get(sweep.sweep_batch(graphdef, stacked, batch, np.ones(1, np.float32),
                                            np.asarray(eps, np.float32), 3))
    assert compile_count() - before == 1  # the whole grid is one program
    one = jax.jit(lambda p, e: robustness._correct_under_attack(graphdef, p, batch, e, adv))
    looped = [float(one(params, jnp.float32(e))[0]) for e in eps]
    np.testing.assert_array_equal(sums["robust"][0], looped)
    assert looped[0] >= looped[-1]
    rows = robustness.robust_accuracy(model, {k: np.asarray(v) for k, v in batch.items() if k not in ("index", "weight")},
                                      eps, steps=3, batch_size=8)
    assert [r["accuracy"] for r in rows] == pytest.approx([c / 16 for c in looped])


def run_adv(folder, backend, n, steps=2):
    graphdef, params = nnx.split(bert.from_pretrained(folder, "sequence-classification"))
    adv = A.Adversary(method="pgd", norm="l2", epsilon=0.3, inner_steps=2, clean_weight=0.5)
    return run_backend(lambda tx: A.make_train_step(graphdef, tx, adv, CLS), params, backend, n, steps)


def test_jit_sharded_and_pmap_equal_single_device(dirs):
    ref, ref_params, compiles = run_adv(dirs["nodrop"], "jit", 1)
    assert compiles == [1, 0]
    for backend in ("jit", "pmap"):
        got, params, compiles = run_adv(dirs["nodrop"], backend, 8)
        assert compiles[1:] == [0]
        for a, b in zip(got, ref):
            for k in b:
                assert a[k] == pytest.approx(b[k], abs=1e-5), (backend, k)
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(x, y, atol=1e-6)
