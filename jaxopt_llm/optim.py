"""Optimiser factory on optax: AdamW, warmup + decay, clipping, decay mask, accumulation, skipping."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_llm.config import TrainConfig
from jaxopt_llm.errors import UserError

_NO_DECAY = ("bias", "scale")  # biases and LayerNorm scales: no weight decay (as in BERT)


def schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_steps`, then linear / cosine decay to 0 at `steps`."""
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    if cfg.decay == "constant":
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    else:
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(params):
    """True for leaves that get weight decay: every parameter but biases and LayerNorm scales."""
    def name(path) -> str:  # the last dict key: nnx.Param adds an attribute key ("value") after it
        return next((str(k.key) for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)), "")

    return jax.tree_util.tree_map_with_path(lambda path, _: name(path) not in _NO_DECAY, params)


class SkipState(NamedTuple):
    inner: Any  # the state of `reference(cfg)`: (clip's, (ScaleByAdamState, MaskedState, ScaleByScheduleState))
    skipped: jax.Array  # int32: updates skipped so far


def reference(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax chain that `clipped_adamw` computes: clip(global norm) -> AdamW(schedule, decay mask). Its
    state is the layout `clipped_adamw` keeps (inside `SkipState`), so checkpoints of either restore into both."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def clipped_adamw(cfg: TrainConfig) -> optax.GradientTransformation:
    """`reference(cfg)`'s update, written as one elementwise expression per parameter, that skips a step whose
    gradient global norm or learning rate is not finite: the update is zero, the state is kept (counts too),
    and `skipped` counts it.

    Invariant that makes the two scalars a full guard: with a finite norm the clipped gradient is bounded by
    `max_grad_norm`, so mu and nu stay finite from their zero init, and with a finite rate the update
    (mu_hat / (sqrt(nu_hat) + eps) + decay * param) * -rate is finite. Checking every element of the update
    instead (optax's `apply_if_finite` way) costs extra passes over the parameters and both moments: it
    doubled the optimiser's time (README, Speed)."""
    inner, rate_at = reference(cfg), schedule(cfg)
    b1, b2, eps, max_norm, decay = cfg.adam_b1, cfg.adam_b2, cfg.adam_eps, cfg.max_grad_norm, cfg.weight_decay

    def init(params):
        return SkipState(inner.init(params), jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        if params is None:
            raise UserError("clipped_adamw needs the parameters (weight decay): call update(grads, state, params).")
        clip_state, (adam, masked, sched) = state.inner
        norm = optax.tree.norm(grads)
        rate = rate_at(sched.count)
        ok = jnp.isfinite(norm) & jnp.isfinite(rate)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        count = optax.safe_increment(adam.count)
        fix1, fix2 = 1 - b1 ** count, 1 - b2 ** count

        # optax's clip_by_global_norm, scale_by_adam, add_decayed_weights and scale_by_learning_rate, operation
        # for operation but the clip: g * (max_norm / norm), where optax writes (g / norm) * max_norm out as a
        # clipped copy of g (within an ulp of it). The moments are selected before the update reads them, so
        # the parameter pass reads the new moments and XLA never copies the old ones: per parameter, one read
        # of g for the norm, then mu and nu (each reading g) and the parameter (reading both new moments).
        def leaf(g, mu, nu, p, decayed):
            g = g * scale.astype(g.dtype)
            mu = jnp.where(ok, (1 - b1) * g + b1 * mu, mu)
            nu = jnp.where(ok, (1 - b2) * (g ** 2) + b2 * nu, nu)
            u = (mu / fix1.astype(mu.dtype)) / (jnp.sqrt(nu / fix2.astype(nu.dtype) + 0.0) + eps)
            if decayed:
                u = u + decay * p
            u = jnp.asarray(-rate, u.dtype) * u
            return jnp.where(ok, u, jnp.zeros_like(u)), mu, nu

        tree = jax.tree.structure(grads)
        columns = zip(*(tree.flatten_up_to(t) for t in (grads, adam.mu, adam.nu, params, decay_mask(params))))
        updates, mu, nu = (tree.unflatten(c) for c in zip(*(leaf(*column) for column in columns)))
        adam = adam._replace(count=jnp.where(ok, count, adam.count), mu=mu, nu=nu)
        sched = sched._replace(count=jnp.where(ok, optax.safe_increment(sched.count), sched.count))
        skipped = state.skipped + 1 - ok.astype(jnp.int32)
        return updates, SkipState((clip_state, (adam, masked, sched)), skipped)

    return optax.GradientTransformation(init, update)


def make(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, decay mask), steps with a non-finite gradient norm or rate skipped
    (`clipped_adamw`); `grad_accum` batches averaged per update. One call of `update` per batch; the schedule
    counts updates."""
    tx = clipped_adamw(cfg)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


def skipped_updates(opt_state) -> jax.Array:
    """Updates skipped for non-finite values so far."""
    found = [s.skipped for s in jax.tree.leaves(opt_state, is_leaf=_is_skip_state) if _is_skip_state(s)]
    return jnp.max(found[0]) if found else jnp.zeros((), jnp.int32)  # an ensemble's: its worst member


def _is_skip_state(x) -> bool:
    return isinstance(x, SkipState)
