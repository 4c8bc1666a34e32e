"""ELECTRA in Flax NNX: BERT's layers (the same computation) with

- embeddings `embedding_size` wide, LayerNorm'd there, then projected to the hidden size when the two differ
  (`embeddings_project`);
- the classification head dense -> GELU -> out_proj on [CLS], dropout before and after the dense (our
  `pooler` is its dense, our `classifier` its out_proj) -- a discriminator fine-tunes with it;
- the generator's masked-LM head: dense to the embedding size -> activation -> LayerNorm -> the word
  embeddings tied as decoder, plus a bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx

from jaxopt_llm.bert.modeling import (
    Bert,
    BertConfig,
    Embeddings,
    MaskedLMHead,
    _erf_gelu,
    _Factory,
)


@dataclasses.dataclass(frozen=True)
class ElectraConfig(BertConfig):
    embedding_size: int | None = None  # None: the hidden size (no projection)

    MODEL_TYPE: ClassVar[str] = "electra"
    HF_CONFIG: ClassVar[str] = "ElectraConfig"

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @classmethod
    def from_hf_config(cls, hf: Any, **changes: Any) -> ElectraConfig:
        d = hf if isinstance(hf, dict) else hf.to_dict()
        config = super().from_hf_config(d, **changes)
        size = d.get("embedding_size")
        return config.replace(embedding_size=None if size in (None, config.hidden_size) else int(size))

    def to_hf_config(self, architectures: tuple[str, ...] = ()) -> Any:
        hf = super().to_hf_config(architectures)
        hf.embedding_size = self.embedding_width
        return hf


class Electra(Bert):
    """`Bert` with ELECTRA's embeddings, classification head and generator head; tasks base, masked-lm and
    sequence-classification."""

    def __init__(self, config: ElectraConfig, task: str = "base", *, rngs: nnx.Rngs):
        super().__init__(config, task, rngs=rngs)
        width = config.embedding_width
        make = _Factory(config, rngs)
        if width != config.hidden_size:
            self.embeddings = Embeddings(config, make, width)
            self.embeddings_project = make.linear(width, config.hidden_size)
            if self.mlm is not None:
                self.mlm = MaskedLMHead(config, make, width)
        else:
            self.embeddings_project = None
        if task == "base":
            self.pooler = None  # ElectraModel has none

    def project(self, x_bte: jax.Array) -> jax.Array:
        return x_bte if self.embeddings_project is None else self.embeddings_project(x_bte)

    def classify_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                        dropout_key: jax.Array | None = None) -> jax.Array:
        return self.dense_head_logits(hidden_btd, _erf_gelu, deterministic, dropout_key)
