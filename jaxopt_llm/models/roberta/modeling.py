"""RoBERTa / XLM-RoBERTa in Flax NNX: BERT's layers (the same computation), with

- positions counted from `pad_token_id + 1` over the real tokens (HF's `create_position_ids_from_input_ids`,
  from the attention mask here: padding is where the mask is 0), so a model holds `max_position_embeddings -
  pad_token_id - 1` tokens;
- the classification head dense -> tanh -> out_proj on <s>, dropout before and after the dense (our `pooler`
  is its dense, our `classifier` its out_proj);
- the masked-LM head of BERT's shape (dense, GELU, LayerNorm, decoder tied to the embeddings, bias).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxopt_llm.models.bert.modeling import Bert, BertConfig


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 514
    type_vocab_size: int = 1

    MODEL_TYPE: ClassVar[str] = "roberta"
    HF_CONFIG: ClassVar[str] = "RobertaConfig"

    @property
    def max_tokens(self) -> int:
        """Positions 0 .. pad_token_id are never used by tokens."""
        return self.max_position_embeddings - self.pad_token_id - 1


@dataclasses.dataclass(frozen=True)
class XLMRobertaConfig(RobertaConfig):
    MODEL_TYPE: ClassVar[str] = "xlm-roberta"
    HF_CONFIG: ClassVar[str] = "XLMRobertaConfig"


class Roberta(Bert):
    """`Bert` with RoBERTa's positions and classification head; tasks base, masked-lm and
    sequence-classification."""

    def positions(self, attention_mask, position_ids, b: int, t: int) -> jax.Array:
        pad = self.config.pad_token_id
        if position_ids is not None:  # the caller's positions count from 0, as for BERT
            return position_ids + pad + 1
        if attention_mask is None or attention_mask.ndim != 2:
            return jnp.broadcast_to(jnp.arange(t) + pad + 1, (b, t))
        real = (attention_mask > 0).astype(jnp.int32)
        return jnp.cumsum(real, axis=1) * real + pad

    def classify_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                        dropout_key: jax.Array | None = None, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.dense_head_logits(hidden_btd, jnp.tanh, deterministic, dropout_key)


class XLMRoberta(Roberta):
    """XLM-RoBERTa: RoBERTa's architecture (a SentencePiece vocabulary of its own)."""
