"""The masked-LM task, with optional next-sentence prediction and whole-word masking.

batch: input_ids, attention_mask, token_type_ids, special_tokens_mask (b, t) int32; index (b,) int32, the
example's row in the dataset (masks are drawn per example from fold_in(step key, index), so any sharding
of the batch draws the same masks); optional word_ids (b, t) (-1 for special tokens) and
next_sentence_label (b,); weight (b,) float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxopt_llm import losses
from jaxopt_llm.parallel import global_mean, global_sum
from jaxopt_llm.steps.common import Metrics, mean_metrics
from jaxopt_llm.steps.task import DataNeeds, Prepared, Targets


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


@dataclasses.dataclass(frozen=True)
class MaskedLMTask:
    """Masked LM (+ NSP when `next_sentence`). Eval masks come from `eval_seed`, the same at every eval."""

    masking: Masking
    next_sentence: bool = False
    eval_seed: int = 0
    name: str = "masked-lm"

    @property
    def head(self) -> str:
        return "pretraining" if self.next_sentence else "masked-lm"

    @property
    def data(self) -> DataNeeds:
        return DataNeeds(labels=False, word_ids=self.masking.whole_word, next_sentence=self.next_sentence)

    def prepare(self, batch, key):
        """extra = (positions (b, P), labels (b, P), weights (b, P)); key None: the fixed eval masks."""
        if key is None:
            mask_key, dropout_key = jax.random.key(self.eval_seed), None
        else:
            mask_key, dropout_key = jax.random.split(key)
        masked, positions, labels, weights = mask_batch(mask_key, batch, self.masking)
        return Prepared(masked, (positions, labels, weights), dropout_key)

    def forward(self, model, embeddings, batch, extra, *, deterministic=True, dropout_key=None, collect=None):
        """(MLM logits at the masked positions (b, P, v), NSP logits (b, 2) or None). The last layer and the
        vocabulary projection run only at the positions read (every position when collecting)."""
        positions = extra[0]
        nsp = model.nsp is not None and "next_sentence_label" in batch
        read = jnp.concatenate([jnp.zeros_like(positions[:, :1]), positions], 1) if nsp else positions
        hidden = model.encode(embeddings, batch["attention_mask"], batch["token_type_ids"],
                              deterministic=deterministic, dropout_key=dropout_key,
                              output_positions=None if collect is not None else read, collect=collect)
        if collect is not None:
            hidden = jnp.take_along_axis(hidden, read[..., None], axis=1)
        mlm = model.mlm_logits(hidden[:, 1:] if nsp else hidden)
        return mlm, (model.nsp_logits(hidden) if nsp else None)

    def targets(self, outputs, batch, extra):
        _, labels, weights = extra
        return Targets(outputs[0], labels, (weights > 0) & (batch["weight"][:, None] > 0))

    def loss(self, outputs, batch, extra):
        mlm_logits, nsp_logits = outputs
        _, labels_bp, valid_bp = self.targets(outputs, batch, extra)
        total, count = losses.masked_sum(losses.cross_entropy(mlm_logits, labels_bp, valid_bp), valid_bp)
        correct = (jnp.argmax(mlm_logits, -1) == labels_bp).astype(jnp.float32)
        metrics = {"loss": (total, count), "mlm_loss": (total, count),
                   "mlm_accuracy": losses.masked_sum(correct, valid_bp)}
        loss = global_mean(total, count)
        if nsp_logits is not None:
            valid_b = batch["weight"] > 0
            nsp_total, nsp_count = losses.masked_sum(
                losses.cross_entropy(nsp_logits, batch["next_sentence_label"], valid_b), valid_b)
            nsp_correct = (jnp.argmax(nsp_logits, -1) == batch["next_sentence_label"]).astype(jnp.float32)
            metrics["nsp_loss"] = (nsp_total, nsp_count)
            metrics["nsp_accuracy"] = losses.masked_sum(nsp_correct, valid_b)
            loss = loss + global_mean(nsp_total, nsp_count)
            # this device's share of the global MLM + NSP loss; the shares' counts add up to 1 over devices
            metrics["loss"] = (loss, count / jnp.maximum(global_sum(count), 1.0))
        return loss, metrics

    def eval_metrics(self, outputs, batch, extra):
        return self.loss(outputs, batch, extra)[1]

    def summarize(self, sums: Metrics) -> dict[str, float]:
        return mean_metrics(sums)

    def files(self):
        return {}

    def baseline(self, train, eval):
        return {}


def task_from_config(config, tokenizer) -> MaskedLMTask:
    d = config.data
    masking = Masking(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), rate=d.mlm_probability,
                      max_predictions=d.max_predictions_per_seq, whole_word=d.whole_word_masking)
    return MaskedLMTask(masking, next_sentence=d.next_sentence, eval_seed=config.train.seed)
