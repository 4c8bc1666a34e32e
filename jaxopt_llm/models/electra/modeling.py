"""ELECTRA in Flax NNX: BERT's layers (the same computation) with

- embeddings `embedding_size` wide, LayerNorm'd there, then projected to the hidden size when the two differ
  (`embeddings_project`);
- the classification head dense -> GELU -> out_proj on [CLS], dropout before and after the dense (our
  `pooler` is its dense, our `classifier` its out_proj) -- a discriminator fine-tunes with it;
- the generator's masked-LM head: dense to the embedding size -> GELU (whatever hidden_act says) ->
  LayerNorm -> the word embeddings tied as decoder, plus a bias;
- the discriminator's replaced-token-detection head (task "replaced-token-detection", transformers'
  ElectraForPreTraining): dense -> hidden_act -> dense to one logit per token, (b, t).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_llm.errors import UserError
from jaxopt_llm.models.bert.modeling import TASKS, Bert, BertConfig, Embeddings, MaskedLMHead, _Factory
from jaxopt_llm.models.layers import _ACTIVATIONS, _erf_gelu

RTD = "replaced-token-detection"


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


class Discriminator(nnx.Module):
    def __init__(self, cfg: ElectraConfig, make: _Factory):
        self.act = cfg.hidden_act
        self.dense = make.linear(cfg.hidden_size, cfg.hidden_size)
        self.prediction = make.linear(cfg.hidden_size, 1)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        return self.prediction(_ACTIVATIONS[self.act](self.dense(x_btd)))[..., 0].astype(jnp.float32)


class Electra(Bert):
    """`Bert` with ELECTRA's embeddings, classification head, generator head and discriminator head; tasks
    base, masked-lm, sequence-classification and replaced-token-detection (logits (b, t): > 0 = replaced)."""

    def __init__(self, config: ElectraConfig, task: str = "base", *, rngs: nnx.Rngs):
        if task not in (*TASKS, RTD) or task == "pretraining":
            raise UserError(f"task={task!r}: ELECTRA has the tasks base, masked-lm, sequence-classification and {RTD}.")
        super().__init__(config, "base" if task == RTD else task, rngs=rngs)
        self.task = task
        width = config.embedding_width
        make = _Factory(config, rngs)
        if width != config.hidden_size:
            self.embeddings = Embeddings(config, make, width)
            self.embeddings_project = make.linear(width, config.hidden_size)
        else:
            self.embeddings_project = None
        if self.mlm is not None:
            self.mlm = MaskedLMHead(config, make, width, activation="gelu")
        if task in ("base", RTD):
            self.pooler = None  # ElectraModel has none
        self.discriminator = Discriminator(config, make) if task == RTD else None

    def project(self, x_bte: jax.Array) -> jax.Array:
        return x_bte if self.embeddings_project is None else self.embeddings_project(x_bte)

    def heads(self, hidden_btd: jax.Array, *, deterministic: bool = True, dropout_key: jax.Array | None = None,
              attention_mask: jax.Array | None = None):
        if self.task == RTD:
            return self.rtd_logits(hidden_btd)
        return super().heads(hidden_btd, deterministic=deterministic, dropout_key=dropout_key,
                             attention_mask=attention_mask)

    def rtd_logits(self, hidden_btd: jax.Array) -> jax.Array:
        """Replaced-token logits (b, t) in float32."""
        return self.discriminator(hidden_btd)

    def classify_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                        dropout_key: jax.Array | None = None, attention_mask: jax.Array | None = None) -> jax.Array:
        return self.dense_head_logits(hidden_btd, _erf_gelu, deterministic, dropout_key)
