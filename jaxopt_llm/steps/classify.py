"""Sequence classification (cross-entropy) and regression (num_labels == 1, squared error) steps.

batch: input_ids, attention_mask, token_type_ids (b, t) int32; labels (b,) int32 (float32 for regression);
weight (b,) float32, 0 for padding rows of the last eval batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm.bert.modeling import Bert
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps.common import Metrics, apply_gradients, global_count, psum, step_key


def logits_from_embeddings(model: Bert, embeddings_btd: jax.Array, batch: dict, *, deterministic: bool = True,
                           dropout_key: jax.Array | None = None) -> jax.Array:
    """Class logits (b, c) from word embeddings; the last layer runs at [CLS] only."""
    k_encode, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    cls_b1 = jnp.zeros((embeddings_btd.shape[0], 1), jnp.int32)
    hidden = model.encode(embeddings_btd, batch["attention_mask"], batch["token_type_ids"],
                          deterministic=deterministic, dropout_key=k_encode, output_positions_bp=cls_b1)
    return model.classify_logits(hidden, deterministic=deterministic, dropout_key=k_head)


def loss_and_metrics(logits_bc: jax.Array, batch: dict, axis_name: str | None = None) -> tuple[jax.Array, Metrics]:
    """Mean loss over the global batch (for gradients) and (sum, count) metrics."""
    valid = batch["weight"] > 0
    if logits_bc.shape[-1] == 1:
        per_example = losses.squared_error(logits_bc[:, 0], batch["labels"], valid)
        metrics = {}
    else:
        per_example = losses.cross_entropy(logits_bc, batch["labels"], valid)
        correct = (jnp.argmax(logits_bc, -1) == batch["labels"]).astype(jnp.float32)
        metrics = {"accuracy": losses.masked_sum(correct, valid)}
    total, count = losses.masked_sum(per_example, valid)
    metrics["loss"] = (total, count)
    return total / global_count(count, axis_name), metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    axis_name: str | None = None) -> Callable:
    """`train_step(state, batch, key) -> (state, metrics)`; `axis_name` when run under pmap."""

    def loss_fn(params, batch, dropout_key):  # first argument is what is differentiated
        model = nnx.merge(graphdef, params)
        logits = logits_from_embeddings(model, model.embed(batch["input_ids"]), batch, deterministic=False,
                                        dropout_key=dropout_key)
        return loss_and_metrics(logits, batch, axis_name)

    def train_step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, Metrics]:
        dropout_key = step_key(key, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, dropout_key)
        return apply_gradients(state, psum(grads, axis_name), tx), psum(metrics, axis_name)

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, axis_name: str | None = None) -> Callable:
    """`eval_step(params, batch) -> metrics`: loss, accuracy and the confusion matrix (for macro-F1)."""

    def eval_step(params, batch: dict) -> Metrics:
        model = nnx.merge(graphdef, params)
        logits = logits_from_embeddings(model, model.embed(batch["input_ids"]), batch)
        _, metrics = loss_and_metrics(logits, batch, axis_name)
        if logits.shape[-1] > 1:
            c = logits.shape[-1]
            pairs = batch["labels"] * c + jnp.argmax(logits, -1)
            confusion = jnp.zeros(c * c, jnp.float32).at[pairs].add(batch["weight"]).reshape(c, c)
            metrics["confusion"] = (confusion, metrics["loss"][1])
        return psum(metrics, axis_name)

    return eval_step
