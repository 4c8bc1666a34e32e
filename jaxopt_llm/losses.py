"""Pure, unreduced losses. Inputs are cast to float32 before softmax; masked entries are exactly 0.

Reduce with `masked_sum` into (sum, count) pairs so that means stay right when summed over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_nc: jax.Array, labels_n: jax.Array, where_n: jax.Array | None = None) -> jax.Array:
    """Softmax cross-entropy with integer labels, per example: -log softmax(logits)[label].

    logits (..., c), labels (...) int, where (...) bool -> (...) float32, 0 where `where` is False.
    >>> cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))  # log 2
    """
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits_nc.astype(jnp.float32), labels_n)
    return loss if where_n is None else jnp.where(where_n, loss, 0.0)


def squared_error(pred_n: jax.Array, target_n: jax.Array, where_n: jax.Array | None = None) -> jax.Array:
    """(pred - target)^2 per example, float32, 0 where `where` is False."""
    loss = jnp.square(pred_n.astype(jnp.float32) - target_n.astype(jnp.float32))
    return loss if where_n is None else jnp.where(where_n, loss, 0.0)


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0,
                  where: jax.Array | None = None) -> jax.Array:
    """KL(p_t || p_s) per example with p = softmax(logits / T), over the last axis, float32.

    Zero when the two logits agree up to a constant. Hinton et al. (2015) scale it by T^2 (see distill).
    """
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    loss = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
    return loss if where is None else jnp.where(where, loss, 0.0)


def masked_sum(values: jax.Array, where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of values where `where`, number of such entries) as float32 scalars."""
    where = jnp.ones(values.shape, bool) if where is None else jnp.broadcast_to(where, values.shape)
    return jnp.sum(jnp.where(where, values, 0.0), dtype=jnp.float32), jnp.sum(where, dtype=jnp.float32)


def distillation(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: float,
                 temperature: float, where: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Knowledge distillation (Hinton et al., 2015), per example:

        L = (1 - alpha) * CE(softmax(z_s), y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

    The T^2 keeps the soft term's gradient scale independent of T. logits (..., c), labels (...) ->
    (total, ce, kl) each (...) float32, 0 where `where` is False. The teacher's logits carry no gradient.
    """
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    ce = cross_entropy(student_logits, labels, where)
    kl = kl_divergence(teacher_logits, student_logits, temperature, where)
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl, ce, kl
