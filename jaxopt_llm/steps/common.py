"""What every step shares: the step key, applying gradients, (sum, count) metrics, and encoding every token."""

from __future__ import annotations

import jax
import optax

from jaxopt_llm.state import TrainState

Metrics = dict[str, tuple[jax.Array, jax.Array]]


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
    """The key of one step: a typed key from `key` (typed or raw uint32 key data) folded with the step."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.fold_in(key, step)


def mean_metrics(metrics: Metrics) -> dict[str, float]:
    """{name: sum / count} on the host."""
    out = {}
    for name, (total, count) in jax.device_get(metrics).items():
        total, count = float(total.sum()), float(count.sum())
        out[name] = total / count if count else float("nan")
    return out


def encode_every_token(model, embeddings, batch, deterministic: bool, dropout_key, collect):
    """(hidden states (b, t, d) at every position, the head's dropout key): the encoder half of a per-token
    task's forward pass (tagging, span extraction)."""
    k_encode, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    hidden = model.encode(embeddings, batch["attention_mask"], batch["token_type_ids"], deterministic=deterministic,
                          dropout_key=k_encode, collect=collect)
    return hidden, k_head
