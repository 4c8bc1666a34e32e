"""DistilBERT in Flax NNX: BERT's layers (the same computation) with

- no token-type embeddings (type_vocab_size 0) and no pooler in the base model;
- the classification head pre_classifier -> ReLU -> dropout(seq_classif_dropout) -> classifier on [CLS]
  (our `pooler` is its pre_classifier);
- the masked-LM head vocab_transform -> activation -> vocab_layer_norm -> projector tied to the embeddings.
Its config names (dim, n_layers, n_heads, hidden_dim, activation, dropout, ...) map onto BERT's fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_llm.models.bert.modeling import Bert, BertConfig
from jaxopt_llm.models.layers import _check_dropout_key, dropout

_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
          "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
          "attention_dropout": "attention_probs_dropout_prob", "seq_classif_dropout": "classifier_dropout"}


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(BertConfig):
    type_vocab_size: int = 0  # none: DistilBERT has no token types
    num_hidden_layers: int = 6
    classifier_dropout: float | None = 0.2

    MODEL_TYPE: ClassVar[str] = "distilbert"
    HF_CONFIG: ClassVar[str] = "DistilBertConfig"

    @classmethod
    def from_hf_config(cls, hf: Any, **changes: Any) -> DistilBertConfig:
        d = dict(hf if isinstance(hf, dict) else hf.to_dict())
        for theirs, ours in _NAMES.items():
            if theirs in d:
                d[ours] = d.pop(theirs)
        d["type_vocab_size"], d["layer_norm_eps"] = 0, 1e-12
        return super().from_hf_config(d, **changes)

    def to_hf_config(self, architectures: tuple[str, ...] = ()) -> Any:
        import transformers

        names = self.label_names
        fields = {theirs: getattr(self, ours) for theirs, ours in _NAMES.items()}
        if fields["seq_classif_dropout"] is None:
            fields["seq_classif_dropout"] = self.hidden_dropout_prob
        return transformers.DistilBertConfig(
            vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id, initializer_range=self.initializer_range, **fields,
            architectures=list(architectures) or None, id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            problem_type="regression" if self.num_labels == 1 else None)


class DistilBert(Bert):
    """`Bert` without token types (and without a pooler in the base model), with DistilBERT's classification
    head; tasks base, masked-lm and sequence-classification."""

    def __init__(self, config: DistilBertConfig, task: str = "base", *, rngs: nnx.Rngs):
        super().__init__(config, task, rngs=rngs)
        if task == "base":
            self.pooler = None

    def token_dropout(self) -> float:
        return self.config.hidden_dropout_prob  # DistilBertForTokenClassification drops with config.dropout

    def classify_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                        dropout_key: jax.Array | None = None, attention_mask: jax.Array | None = None) -> jax.Array:
        _check_dropout_key(deterministic, dropout_key)
        cfg = self.config
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        x = jax.nn.relu(self.pooler(hidden_btd[:, 0]))
        return self.classifier(dropout(x, rate, dropout_key, deterministic, cfg.dropout_rng)).astype(jnp.float32)
