"""Min-max adversarial training over an embedding perturbation delta:

    min_theta E_(x, y) [ max_{||delta|| <= eps} L(f_theta(embed(x) + delta), y) ]

The inner maximisation is an optax loop inside the jitted step (`lax.scan`, K static): the gradient is
taken with respect to delta only, an optax transform turns it into an ascent step (sign of the gradient
for L-inf PGD, the per-example normalised gradient for L2; any optax transform may be passed), and
`optax.projections` puts delta back into the ball. delta is zero on padding tokens.

Methods (Madry et al. 2018; FreeLB, Zhu et al. 2020; SMART, Jiang et al. 2020):
  pgd     loss = (1 - w) L(x + delta_K) + w L(x)                        w = clean_weight
  freelb  parameter gradients averaged over the K ascent steps (+ w * clean gradient)
  smart   loss = L(x) + lambda * symKL(f(x), f(x + delta_K)), delta maximising the symmetric KL
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm.errors import UserError
from jaxopt_llm.parallel import global_mean, global_sum
from jaxopt_llm.recipes import Context, Method, Recipe
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps import clean
from jaxopt_llm.steps.common import Metrics, apply_gradients, step_key

METHODS = ("pgd", "freelb", "smart")
NORMS = ("l2", "linf")


@dataclasses.dataclass(frozen=True)
class Adversary:
    """The inner problem: the ball (norm, epsilon), K steps of `inner_lr`, the start, and the outer mix."""

    method: str = "pgd"  # pgd (min-max, Madry et al.) | freelb (ascent gradients averaged) | smart (KL smoothness)
    norm: str = "linf"  # the ball around the word embeddings: linf | l2
    epsilon: float = 0.01  # the ball's radius, in embedding units
    inner_steps: int = 2  # ascent steps K per training step
    inner_lr: float | None = None  # None: 2.5 * epsilon / inner_steps (Madry et al.)
    init: str = "zero"  # zero | uniform (uniform in the ball)
    clean_weight: float = 0.0  # pgd / freelb: weight of the clean loss beside the adversarial one
    smart_weight: float = 1.0  # smart: weight of the smoothness (KL) term
    inner_tx: optax.GradientTransformation | None = None  # replaces the default ascent transform

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"adversarial.method={self.method!r}: use one of {METHODS}.")
        if self.norm not in NORMS:
            raise UserError(f"adversarial.norm={self.norm!r}: use one of {NORMS}.")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0):  # NaN fails every comparison
            raise UserError(f"adversarial.epsilon={self.epsilon}: must be a finite number >= 0.")
        if self.inner_steps < 0:
            raise UserError(f"adversarial.inner_steps={self.inner_steps}: must be >= 0.")
        if self.inner_lr is not None and not (math.isfinite(self.inner_lr) and self.inner_lr > 0):
            raise UserError(f"adversarial.inner_lr={self.inner_lr}: must be a finite number > 0 (or None).")
        if not (math.isfinite(self.smart_weight) and self.smart_weight >= 0):
            raise UserError(f"adversarial.smart_weight={self.smart_weight}: must be a finite number >= 0.")
        if self.init not in ("zero", "uniform"):
            raise UserError(f"adversarial.init={self.init!r}: use 'zero' or 'uniform'.")
        if not 0.0 <= self.clean_weight <= 1.0:  # False for NaN
            raise UserError(f"adversarial.clean_weight={self.clean_weight}: must be in [0, 1].")
        if self.method == "smart" and self.init == "zero" and self.inner_tx is None:
            raise UserError("adversarial.method=smart with init=zero cannot move: the symmetric KL has zero "
                             "gradient at delta = 0. Use adversarial.init=uniform.")
        if self.method == "freelb" and self.inner_steps < 1:
            raise UserError("adversarial.method=freelb needs adversarial.inner_steps >= 1.")


def ascent(adv: Adversary, epsilon) -> optax.GradientTransformation:
    """Maps the gradient of the loss to the increment of delta: +lr * sign(g) (L-inf), +lr * g / ||g||
    per example (L2), with lr = inner_lr or 2.5 * eps / K (Madry et al.). A user's `inner_tx` minimises,
    so it is fed -g."""
    if adv.inner_tx is not None:
        return optax.chain(optax.scale(-1.0), adv.inner_tx)
    lr = adv.inner_lr if adv.inner_lr is not None else 2.5 * epsilon / max(adv.inner_steps, 1)
    direction = optax.scale_by_sign() if adv.norm == "linf" else scale_by_example_norm()
    return optax.chain(direction, optax.scale(lr))


def scale_by_example_norm(eps: float = 1e-12) -> optax.GradientTransformation:
    """g / ||g||_2 per example (leading axis): the steepest ascent direction in an L2 ball."""

    def update(updates, state, params=None):
        del params
        def one(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)), keepdims=True))
            return g / jnp.maximum(norm, eps)
        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def project(delta_btd: jax.Array, token_mask_bt: jax.Array, norm: str, epsilon) -> jax.Array:
    """Into the ball (L2 per example over all its tokens, or L-inf per element), zero on padding."""
    delta_btd = delta_btd * token_mask_bt[..., None]
    if norm == "linf":
        return optax.projections.projection_linf_ball(delta_btd, epsilon)
    return jax.vmap(lambda d: optax.projections.projection_l2_ball(d, epsilon))(delta_btd)


def delta_norm(delta_btd: jax.Array, norm: str) -> jax.Array:
    """Per-example norm (b,) in the attack's geometry."""
    if norm == "linf":
        return jnp.max(jnp.abs(delta_btd), axis=(1, 2))
    return jnp.sqrt(jnp.sum(jnp.square(delta_btd), axis=(1, 2)))


def initial_delta(key: jax.Array, shape, token_mask_bt, adv: Adversary, epsilon) -> jax.Array:
    if adv.init == "zero":
        return jnp.zeros(shape, jnp.float32)
    if adv.norm == "linf":
        delta = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * epsilon
    else:  # uniform in the L2 ball of the example's real tokens: direction on the sphere, radius eps * u^(1/n)
        direction = jax.random.normal(key, shape) * token_mask_bt[..., None]
        n = jnp.maximum(token_mask_bt.sum(1), 1) * shape[-1]
        radius = epsilon * jax.random.uniform(jax.random.fold_in(key, 1), (shape[0],)) ** (1.0 / n)
        delta = direction / jnp.maximum(delta_norm(direction, "l2"), 1e-12)[:, None, None] * radius[:, None, None]
    return project(delta, token_mask_bt, adv.norm, epsilon)


def symmetric_kl(a_logits, b_logits, where=None) -> jax.Array:
    """KL(p_a || p_b) + KL(p_b || p_a) per example (b,), summed over any positions axis."""
    kl = losses.kl_divergence(a_logits, b_logits) + losses.kl_divergence(b_logits, a_logits)
    if where is not None:
        kl = jnp.where(where, kl, 0.0)
    return kl if kl.ndim == 1 else kl.sum(axis=tuple(range(1, kl.ndim)))


# ---- the inner loop --------------------------------------------------------------------------------


class Attack(NamedTuple):
    delta: jax.Array  # (b, t, d) after K steps
    first_value: jax.Array  # the objective at delta_0 (the clean loss when init is zero)
    mean_value: jax.Array  # the objective averaged over the K steps (FreeLB's loss)
    norms: jax.Array  # (K, b) per-example norm after each step
    param_grads: Any  # FreeLB: parameter gradients averaged over the K steps, else None


def attack(objective: Callable, params, shape, token_mask_bt, adv: Adversary, key, epsilon=None,
           accumulate_params: bool = False) -> Attack:
    """K ascent steps of `objective(params, delta) -> scalar` over delta only (params held fixed, wrapped in
    stop_gradient), starting from `adv.init`, projected into the ball after every step.

    With `accumulate_params` (FreeLB) each step's backward pass also yields the parameter gradient,
    averaged over the K steps. `epsilon` may be traced (the robustness sweep vmaps over it).
    """
    epsilon = adv.epsilon if epsilon is None else epsilon
    tx = ascent(adv, epsilon)
    delta0 = initial_delta(key, shape, token_mask_bt, adv, epsilon)
    k = max(adv.inner_steps, 1)

    def step(carry, _):
        delta, opt_state, acc, first, total = carry
        if accumulate_params:
            value, (g_params, g_delta) = jax.value_and_grad(objective, argnums=(0, 1))(params, delta)
            acc = jax.tree.map(lambda a, g: a + g / k, acc, g_params)
        else:
            value, g_delta = jax.value_and_grad(lambda d: objective(jax.lax.stop_gradient(params), d))(delta)
        first = jnp.where(jnp.isnan(first), value, first)
        updates, opt_state = tx.update(g_delta, opt_state, delta)
        delta = project(delta + updates, token_mask_bt, adv.norm, epsilon)
        return (delta, opt_state, acc, first, total + value / k), delta_norm(delta, adv.norm)

    acc0 = jax.tree.map(jnp.zeros_like, params) if accumulate_params else None
    nan = jnp.array(jnp.nan, jnp.float32)
    carry = (delta0, tx.init(delta0), acc0, nan, jnp.zeros((), jnp.float32))
    (delta, _, acc, first, mean), norms = jax.lax.scan(step, carry, None, length=adv.inner_steps)
    return Attack(delta, first, mean, norms, acc)


# ---- the train step --------------------------------------------------------------------------------


def correct_sum(targets) -> tuple[jax.Array, jax.Array]:
    """(correct predictions, scored items) of a task's targets; (0, n) for a one-output (regression) head."""
    if targets.logits.shape[-1] == 1:
        return jnp.zeros((), jnp.float32), jnp.sum(targets.where, dtype=jnp.float32)
    return losses.masked_sum((jnp.argmax(targets.logits, -1) == targets.labels).astype(jnp.float32), targets.where)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, adv: Adversary, task) -> Callable:
    """`train_step(state, batch, key, aux=None) -> (state, metrics)` with the adversarial inner loop inside.

    Keys: the step key feeds the task exactly as the clean step does (masks, dropout), so K = 0 with a
    zero start is the clean step; delta's start has its own stream, fold_in(step key, 1).
    """

    def forward(params, delta, batch, prepared):
        model = nnx.merge(graphdef, params)
        emb = model.embed(prepared.input_ids)
        return task.forward(model, emb if delta is None else emb + delta, batch, prepared.extra,
                            deterministic=False, dropout_key=prepared.dropout_key)

    def train_step(state: TrainState, batch: dict, key: jax.Array, aux=None) -> tuple[TrainState, Metrics]:
        sk = step_key(key, state.step)
        prepared = task.prepare(batch, sk)
        extra = prepared.extra
        valid = batch["weight"] > 0
        n_valid = jnp.sum(valid, dtype=jnp.float32)
        share = global_mean(n_valid, n_valid)  # this device's share of the global batch
        params = state.params
        model = nnx.merge(graphdef, params)
        shape = jax.eval_shape(model.embed, prepared.input_ids).shape  # the embeddings' width, not the hidden size

        if adv.method == "smart":
            clean_ref = task.targets(jax.lax.stop_gradient(forward(params, None, batch, prepared)), batch, extra)

            def objective(p, d):
                t = task.targets(forward(p, d, batch, prepared), batch, extra)
                return jnp.sum(symmetric_kl(clean_ref.logits, t.logits, clean_ref.where))
        else:
            def objective(p, d):
                return task.loss(forward(p, d, batch, prepared), batch, extra)[0]

        token_mask = batch["attention_mask"] if prepared.token_mask is None else prepared.token_mask
        found = attack(objective, params, shape, token_mask, adv, jax.random.fold_in(sk, 1),
                       accumulate_params=adv.method == "freelb")
        delta = jax.lax.stop_gradient(found.delta)

        def outer(p):  # first argument is what is differentiated
            adv_out = forward(p, delta, batch, prepared)
            adv_loss, adv_metrics = task.loss(adv_out, batch, extra)
            metrics = {"adv_loss": adv_metrics["loss"], "adv_accuracy": correct_sum(task.targets(adv_out, batch, extra))}
            if adv.method == "pgd" and adv.clean_weight == 0.0:
                return adv_loss, metrics
            clean_out = forward(p, None, batch, prepared)
            clean_loss, clean_metrics = task.loss(clean_out, batch, extra)
            metrics["clean_loss"] = clean_metrics["loss"]
            if adv.method == "smart":
                c, a = task.targets(clean_out, batch, extra), task.targets(adv_out, batch, extra)
                kl_sum, count = losses.masked_sum(symmetric_kl(c.logits, a.logits, c.where), valid)
                metrics["smart_kl"] = (kl_sum, count)
                return clean_loss + adv.smart_weight * global_mean(kl_sum, count), metrics
            if adv.method == "freelb":  # the K ascent steps' parameter gradients are added below
                return adv.clean_weight * clean_loss, metrics
            return (1.0 - adv.clean_weight) * adv_loss + adv.clean_weight * clean_loss, metrics

        (total, metrics), grads = jax.value_and_grad(outer, has_aux=True)(params)
        if adv.method == "freelb":
            grads = jax.tree.map(jnp.add, grads, found.param_grads)
            total = total + found.mean_value
        if "clean_loss" not in metrics:
            if adv.init == "zero" and adv.inner_steps:  # the inner loop's first value is the clean loss
                metrics["clean_loss"] = (found.first_value, share)
            else:
                metrics["clean_loss"] = task.loss(forward(params, None, batch, prepared), batch, extra)[1]["loss"]
        metrics["delta_norm"] = losses.masked_sum(delta_norm(found.delta, adv.norm), valid)
        metrics["loss"] = (total, share)  # this device's share of the global loss; shares add up to 1
        return apply_gradients(state, global_sum(grads), tx), global_sum(metrics)

    return train_step


def build(ctx: Context, adv: Adversary) -> Recipe:
    graphdef, params = nnx.split(ctx.load(ctx.model))
    return Recipe(task=ctx.task, tx=ctx.tx, graphdef=graphdef, params=params,
                  train_step=make_train_step(graphdef, ctx.tx, adv, ctx.task),
                  eval_step=clean.make_eval_step(graphdef, ctx.task), export=lambda p: nnx.merge(graphdef, p))


METHOD = Method("adversarial", Adversary, build,
                help="adversarial training (pgd | freelb | smart) of the config's task; evaluation stays clean")
