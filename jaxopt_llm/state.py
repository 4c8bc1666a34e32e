"""The train state: one pytree of arrays, exactly what a checkpoint holds.

The run's base key is `jax.random.key(train.seed)` and the data position is `step` (one global batch per
step): neither is stored twice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32: train_step calls so far = global batches consumed
    params: nnx.State  # trainable parameters; the graphdef stays outside, static
    opt_state: optax.OptState


def create(params: Any, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def abstract(params: Any, tx: optax.GradientTransformation) -> Any:
    """Shapes and dtypes of the state, allocated nowhere (the target of a checkpoint restore)."""
    return jax.eval_shape(lambda p: create(p, tx), params)
