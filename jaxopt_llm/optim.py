"""Optimiser factory on optax: AdamW, warmup + decay, clipping, decay mask, accumulation, skipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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


def make(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip(global norm) -> AdamW(schedule, decay mask); non-finite updates skipped; `grad_accum` batches
    averaged per update. One call of `update` per batch; the schedule counts updates."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay, mask=decay_mask),
    )
    tx = optax.apply_if_finite(tx, max_consecutive_errors=1_000_000)
    return optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum) if cfg.grad_accum > 1 else tx


def skipped_updates(opt_state) -> jax.Array:
    """Total updates skipped for non-finite gradients so far."""
    found = [s.total_notfinite for s in jax.tree.leaves(opt_state, is_leaf=_is_finite_state)
             if _is_finite_state(s)]
    return found[0] if found else jnp.zeros((), jnp.int32)


def _is_finite_state(x) -> bool:
    return isinstance(x, optax.ApplyIfFiniteState)
