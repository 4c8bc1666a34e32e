"""Optimiser factory on optax: AdamW, warmup + decay, clipping, decay mask, accumulation, skipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from typing import Any, NamedTuple

from jaxopt_llm.config import TrainConfig

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
    inner: Any
    skipped: jax.Array  # int32: updates skipped so far


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner`, except that an update with any non-finite value is not applied: the update is zero, the inner
    state is kept, and `skipped` counts it. It checks what would be applied (the update), so a NaN learning
    rate or a state gone bad is caught as well as a NaN gradient."""

    def init(params):
        return SkipState(inner.init(params), jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        updates, new_inner = inner.update(grads, state.inner, params)
        ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates)]))
        updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates)
        kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_inner, state.inner)
        return updates, SkipState(kept, state.skipped + (1 - ok.astype(jnp.int32)))

    return optax.GradientTransformation(init, update)


def make(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, decay mask); non-finite updates skipped; `grad_accum` batches
    averaged per update. One call of `update` per batch; the schedule counts updates."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    tx = skip_nonfinite(tx)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


def skipped_updates(opt_state) -> jax.Array:
    """Updates skipped for non-finite values so far."""
    found = [s.skipped for s in jax.tree.leaves(opt_state, is_leaf=_is_skip_state) if _is_skip_state(s)]
    return jnp.max(found[0]) if found else jnp.zeros((), jnp.int32)  # an ensemble's: its worst member


def _is_skip_state(x) -> bool:
    return isinstance(x, SkipState)
