"""The train state: one pytree of arrays, exactly what a checkpoint holds."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: train_step calls (batches) so far
    params: nnx.State  # nnx.Param leaves of the model; the graphdef stays outside, static
    opt_state: optax.OptState
    rng: jax.Array  # uint32 key data of the run's base key; steps use fold_in(key, step)
    data_position: jax.Array  # int32: global batches consumed from the training data

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng)


def create(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), data_position=jnp.zeros((), jnp.int32))


def abstract(params: nnx.State, tx: optax.GradientTransformation, seed: int) -> Any:
    """Shapes and dtypes of the state, allocated nowhere (the target of a checkpoint restore)."""
    return jax.eval_shape(lambda p: create(p, tx, seed), params)
