"""Masked-LM pretraining step, with optional next-sentence prediction and whole-word masking.

batch: input_ids, attention_mask, token_type_ids, special_tokens_mask (b, t) int32; index (b,) int32, the
example's row in the dataset (masks are drawn per example from fold_in(step key, index), so any sharding
of the batch draws the same masks); optional word_ids (b, t) (-1 for special tokens) and
next_sentence_label (b,); weight (b,) float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm.bert.modeling import Bert
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps.common import Metrics, apply_gradients, global_count, psum, step_key


@dataclasses.dataclass(frozen=True)
class Masking:
    mask_token_id: int
    vocab_size: int
    rate: float = 0.15
    max_predictions: int = 20
    whole_word: bool = False


def mask_example(key: jax.Array, ids_t: jax.Array, special_t: jax.Array, word_t: jax.Array | None,
                 m: Masking) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """BERT's masking of one sequence: choose min(P, max(1, round(rate * n))) of the n non-special tokens
    (whole words when `word_t` is given); of those, 80 % -> [MASK], 10 % -> a random token, 10 % kept.

    Returns (masked ids (t,), positions (P,), original ids at positions (P,), weights (P,)).
    """
    t = ids_t.shape[0]
    k_pick, k_kind, k_token = jax.random.split(key, 3)
    candidate = special_t == 0
    n = candidate.sum()
    n_mask = jnp.where(n > 0, jnp.clip(jnp.round(n * m.rate), 1, m.max_predictions), 0).astype(jnp.int32)
    u = jax.random.uniform(k_pick, (t,))
    if word_t is not None:  # a word's tokens share its draw; the tiny offset keeps them adjacent in the order
        u = u[jnp.clip(word_t, 0, t - 1)] + jnp.arange(t) * 1e-7
    _, positions = jax.lax.top_k(jnp.where(candidate, -u, -jnp.inf), m.max_predictions)
    weights = jnp.arange(m.max_predictions) < n_mask
    labels = ids_t[positions]
    kind = jax.random.uniform(k_kind, (m.max_predictions,))
    random_token = jax.random.randint(k_token, (m.max_predictions,), 0, m.vocab_size)
    new = jnp.where(kind < 0.8, m.mask_token_id, jnp.where(kind < 0.9, random_token, labels))
    masked = ids_t.at[jnp.where(weights, positions, t)].set(new.astype(ids_t.dtype), mode="drop")
    return masked, jnp.where(weights, positions, 0), labels, weights.astype(jnp.float32)


def mask_batch(key: jax.Array, batch: dict, m: Masking):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
    words = batch.get("word_ids") if m.whole_word else None
    if words is None:
        return jax.vmap(lambda k, i, s: mask_example(k, i, s, None, m))(
            keys, batch["input_ids"], batch["special_tokens_mask"])
    return jax.vmap(lambda k, i, s, w: mask_example(k, i, s, w, m))(
        keys, batch["input_ids"], batch["special_tokens_mask"], words)


def logits_from_embeddings(model: Bert, embeddings_btd: jax.Array, batch: dict, positions_bp: jax.Array, *,
                           deterministic: bool = True, dropout_key: jax.Array | None = None):
    """(MLM logits at `positions_bp` (b, P, v), NSP logits (b, 2) or None). The last layer and the
    vocabulary projection run only at the positions read."""
    nsp = model.nsp is not None and "next_sentence_label" in batch
    read = jnp.concatenate([jnp.zeros_like(positions_bp[:, :1]), positions_bp], 1) if nsp else positions_bp
    hidden = model.encode(embeddings_btd, batch["attention_mask"], batch["token_type_ids"],
                          deterministic=deterministic, dropout_key=dropout_key, output_positions_bp=read)
    mlm = model.mlm_logits(hidden[:, 1:] if nsp else hidden)
    return mlm, (model.nsp_logits(hidden) if nsp else None)


def loss_and_metrics(mlm_logits, nsp_logits, labels_bp, weights_bp, batch, axis_name=None):
    valid_bp = (weights_bp > 0) & (batch["weight"][:, None] > 0)
    total, count = losses.masked_sum(losses.cross_entropy(mlm_logits, labels_bp, valid_bp), valid_bp)
    correct = (jnp.argmax(mlm_logits, -1) == labels_bp).astype(jnp.float32)
    metrics = {"loss": (total, count), "mlm_loss": (total, count),
               "mlm_accuracy": losses.masked_sum(correct, valid_bp)}
    loss = total / global_count(count, axis_name)
    if nsp_logits is not None:
        valid_b = batch["weight"] > 0
        nsp_total, nsp_count = losses.masked_sum(
            losses.cross_entropy(nsp_logits, batch["next_sentence_label"], valid_b), valid_b)
        nsp_correct = (jnp.argmax(nsp_logits, -1) == batch["next_sentence_label"]).astype(jnp.float32)
        metrics["nsp_loss"] = (nsp_total, nsp_count)
        metrics["nsp_accuracy"] = losses.masked_sum(nsp_correct, valid_b)
        loss = loss + nsp_total / global_count(nsp_count, axis_name)
        # this device's share of the global MLM + NSP loss; the shares' counts add up to 1 over devices
        metrics["loss"] = (loss, count / global_count(count, axis_name))
    return loss, metrics


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, masking: Masking,
                    axis_name: str | None = None) -> Callable:
    """`train_step(state, batch, key) -> (state, metrics)`; masks are drawn inside from the step key."""

    def loss_fn(params, batch, masked_ids, positions, labels, weights, dropout_key):
        model = nnx.merge(graphdef, params)
        mlm, nsp = logits_from_embeddings(model, model.embed(masked_ids), batch, positions,
                                          deterministic=False, dropout_key=dropout_key)
        return loss_and_metrics(mlm, nsp, labels, weights, batch, axis_name)

    def train_step(state: TrainState, batch: dict, key: jax.Array) -> tuple[TrainState, Metrics]:
        mask_key, dropout_key = jax.random.split(step_key(key, state.step))
        masked_ids, positions, labels, weights = mask_batch(mask_key, batch, masking)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, masked_ids, positions, labels,
                                                         weights, dropout_key)
        return apply_gradients(state, psum(grads, axis_name), tx), psum(metrics, axis_name)

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, masking: Masking, seed: int = 0, axis_name: str | None = None) -> Callable:
    """`eval_step(params, batch) -> metrics` with masks fixed by `seed`, the same at every evaluation."""

    def eval_step(params, batch: dict) -> Metrics:
        model = nnx.merge(graphdef, params)
        masked_ids, positions, labels, weights = mask_batch(jax.random.key(seed), batch, masking)
        mlm, nsp = logits_from_embeddings(model, model.embed(masked_ids), batch, positions)
        return psum(loss_and_metrics(mlm, nsp, labels, weights, batch, axis_name)[1], axis_name)

    return eval_step
