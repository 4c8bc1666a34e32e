"""BERT in Flax NNX: config, modules, and the embed / encode / heads stages.

Shapes use suffixes: b batch, t tokens, d hidden, h heads, k head size, v vocabulary.
Parameters live in `param_dtype`; matmuls run in `dtype`; softmax, LayerNorm statistics
and returned logits are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_llm.errors import UserError
from jaxopt_llm.models.layers import (  # noqa: F401 - the shared layers, under the names BERT's code uses
    _ACTIVATIONS,
    _RNG_CHOICES,
    DROPOUT_RNGS,
    Encoder,
    Linear,
    _check_dropout_key,
    _dense,
    _erf_gelu,
    _keys,
    attention,
    dense,
    dropout,
    hash_bits,
)

TASKS = ("base", "masked-lm", "pretraining", "sequence-classification", "token-classification", "question-answering")


# HF config keys that we read; everything else in a config.json is ignored.
_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "pad_token_id", "initializer_range", "classifier_dropout",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder and its heads. Field names follow Hugging Face's `BertConfig`."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    classifier_dropout: float | None = None
    num_labels: int = 2
    labels: tuple[str, ...] = ()  # id -> label name; empty means LABEL_i
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = False  # the encoder layers as one lax.scan over stacked parameters (compile time flat in depth)
    remat: str = "none"  # none | full | dots: recompute a scanned layer's activations in the backward pass
    scan_unroll: bool = False  # with scan_layers: XLA writes the loop out over the same stacked parameters
    #                            (compile time grows with depth again; the README's Speed options: measured)
    attention: str = "auto"  # auto: jax.nn.dot_product_attention when no attention dropout or probabilities
    #                          are needed (cuDNN on GPU, XLA elsewhere) | manual: always the explicit softmax
    dropout_rng: str = "hash"  # masks' random words: hash (`hash_bits`) | threefry (`jax.random.bits`, earlier)

    MODEL_TYPE: ClassVar[str] = "bert"  # the HF model_type this config reads and writes
    HF_CONFIG: ClassVar[str] = "BertConfig"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            low = 0 if name == "type_vocab_size" else 1  # 0: no token types (DistilBERT)
            if not isinstance(value, int) or value < low:
                raise UserError(f"{type(self).__name__}.{name}={value!r}: must be an integer >= {low}.")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}: pick sizes with hidden_size % heads == 0.")
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(f"BertConfig.hidden_act={self.hidden_act!r} is not supported; use one of "
                             f"{sorted(_ACTIVATIONS)}.")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if value not in ("float32", "bfloat16", "float16"):
                raise UserError(f"BertConfig.{name}={value!r}: use 'float32', 'bfloat16' or 'float16'.")
        if self.remat not in ("none", "full", "dots"):
            raise UserError(f"BertConfig.remat={self.remat!r}: use 'none', 'full' or 'dots'.")
        if (self.remat != "none" or self.scan_unroll) and not self.scan_layers:
            raise UserError(f"BertConfig.remat={self.remat!r}, scan_unroll={self.scan_unroll}: both apply to "
                             "scanned layers only; set scan_layers=True as well.")
        if self.attention not in ("auto", "manual"):
            raise UserError(f"BertConfig.attention={self.attention!r}: use 'auto' or 'manual'.")
        if self.dropout_rng not in DROPOUT_RNGS:
            raise UserError(f"BertConfig.dropout_rng={self.dropout_rng!r}: use {_RNG_CHOICES}.")
        if self.labels and len(self.labels) != self.num_labels:
            raise UserError(f"BertConfig.labels has {len(self.labels)} names but num_labels={self.num_labels}.")

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position embeddings cover."""
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def replace(self, **changes: Any) -> BertConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes: Any) -> BertConfig:
        return cls(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                   max_position_embeddings=128).replace(**changes)

    @classmethod
    def base(cls, **changes: Any) -> BertConfig:
        return cls().replace(**changes)

    @classmethod
    def large(cls, **changes: Any) -> BertConfig:
        return cls(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096).replace(**changes)

    @classmethod
    def from_hf_config(cls, hf: Any, **changes: Any) -> BertConfig:
        """From a `transformers.BertConfig` or the dict of a config.json."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            raise UserError(f"config model_type={d.get('model_type')!r}: {cls.__name__} reads model_type "
                             f"{cls.MODEL_TYPE!r}; load other families with jaxopt_llm.models.from_pretrained.")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UserError(f"position_embedding_type={d['position_embedding_type']!r} is not supported; "
                             "only 'absolute' position embeddings are.")
        kwargs = {k: d[k] for k in _HF_FIELDS if k in d and (d[k] is not None or k == "classifier_dropout")}
        id2label = d.get("id2label") or {}
        names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        if "num_labels" in changes:
            kwargs["num_labels"] = changes["num_labels"]
        elif names:
            kwargs["num_labels"] = len(names)
        if names and len(names) == kwargs.get("num_labels") and not all(n.startswith("LABEL_") for n in names):
            kwargs["labels"] = names
        kwargs.update(changes)
        return cls(**kwargs)

    def to_hf_config(self, architectures: tuple[str, ...] = ()) -> Any:
        """As the transformers config class of the family (`transformers.BertConfig` here)."""
        import transformers

        fields = {k: getattr(self, k) for k in _HF_FIELDS}
        names = self.label_names
        return getattr(transformers, self.HF_CONFIG)(
            **fields,
            architectures=list(architectures) or None,
            id2label={i: n for i, n in enumerate(names)},
            label2id={n: i for i, n in enumerate(names)},
            problem_type="regression" if self.num_labels == 1 else None,
        )


class _Factory:
    """Builds layers with BERT's initialisation and the config's dtypes."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg, self.rngs = cfg, rngs
        self.init = nnx.initializers.normal(cfg.initializer_range)

    def linear(self, n_in: int, n_out: int) -> Linear:
        return Linear(n_in, n_out, kernel_init=self.init, dtype=self.cfg.dtype,
                          param_dtype=self.cfg.param_dtype, rngs=self.rngs)

    def norm(self, width: int | None = None) -> nnx.LayerNorm:
        return nnx.LayerNorm(width or self.cfg.hidden_size, epsilon=self.cfg.layer_norm_eps, dtype=self.cfg.dtype,
                             param_dtype=self.cfg.param_dtype, use_fast_variance=False, rngs=self.rngs)

    def embed(self, n: int, width: int | None = None) -> nnx.Embed:
        return nnx.Embed(n, width or self.cfg.hidden_size, embedding_init=self.init, dtype=self.cfg.dtype,
                         param_dtype=self.cfg.param_dtype, rngs=self.rngs)


class Embeddings(nnx.Module):
    """Word, position and token-type tables and their LayerNorm, `width` wide (default: the hidden size)."""

    def __init__(self, cfg: BertConfig, make: _Factory, width: int | None = None):
        self.word = make.embed(cfg.vocab_size, width)
        self.position = make.embed(cfg.max_position_embeddings, width)
        self.token_type = make.embed(cfg.type_vocab_size, width) if cfg.type_vocab_size else None
        self.norm = make.norm(width)


class Attention(nnx.Module):
    """Self-attention with fused QKV: qkv kernel is (d, 3d), columns [query | key | value]."""

    def __init__(self, cfg: BertConfig, make: _Factory):
        self.cfg = cfg
        self.qkv = make.linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = make.linear(cfg.hidden_size, cfg.hidden_size)

    def __call__(self, x_btd, bias_b1qt, deterministic, key, positions_bp=None, collect=None):
        """Queries at `positions_bp` (all tokens when None); keys and values always from all tokens.
        bias (b, 1, 1, t), or (b, 1, t, t) for a mask per query. `collect`: a list that receives the attention
        probabilities (b, h, q, s) before dropout."""
        cfg = self.cfg
        b, t, d = x_btd.shape
        n, k = cfg.num_attention_heads, cfg.head_dim
        kernel, bias = self.qkv.kernel[...], self.qkv.bias[...]
        if positions_bp is None:
            qkv = self.qkv(x_btd).reshape(b, t, 3, n, k)
            q_bqhk, k_bshk, v_bshk = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:  # one matmul for keys and values, a small one for the gathered queries
            x_bqd = jnp.take_along_axis(x_btd, positions_bp[..., None], axis=1)
            q_bqhk = _dense(x_bqd, kernel[:, :d], bias[:d], cfg.dtype).reshape(b, -1, n, k)
            kv = _dense(x_btd, kernel[:, d:], bias[d:], cfg.dtype).reshape(b, t, 2, n, k)
            k_bshk, v_bshk = kv[:, :, 0], kv[:, :, 1]
        if positions_bp is not None and bias_b1qt.shape[2] > 1:  # a mask per query: the queries' rows
            bias_b1qt = jnp.take_along_axis(bias_b1qt, positions_bp[:, None, :, None], axis=2)
        no_dropout = deterministic or cfg.attention_probs_dropout_prob == 0.0
        if cfg.attention == "auto" and no_dropout and collect is None:  # the fused kernel where one exists
            ctx = attention(q_bqhk, k_bshk, v_bshk, bias_b1qt, 1.0 / math.sqrt(k))
            return self.out(ctx.reshape(b, ctx.shape[1], d))
        scores = jnp.einsum("bqhk,bshk->bhqs", q_bqhk, k_bshk, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(k) + bias_b1qt
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bshk.dtype)
        if collect is not None:
            collect.append(probs)
        probs = dropout(probs, cfg.attention_probs_dropout_prob, key, deterministic, cfg.dropout_rng)
        ctx = jnp.einsum("bhqs,bshk->bqhk", probs, v_bshk)
        return self.out(ctx.reshape(b, ctx.shape[1], d))


class Layer(nnx.Module):
    def __init__(self, cfg: BertConfig, make: _Factory):
        self.cfg = cfg
        self.attention = Attention(cfg, make)
        self.attention_norm = make.norm()
        self.intermediate = make.linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = make.linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_norm = make.norm()

    def __call__(self, x_btd, bias_b1qt, deterministic, key, positions_bp=None, collect=None):
        """-> (b, t, d), or (b, p, d) at `positions_bp` only."""
        k_attn, k_attn_out, k_out = _keys(key, 3)
        rate = self.cfg.hidden_dropout_prob
        a = self.attention(x_btd, bias_b1qt, deterministic, k_attn, positions_bp, collect)
        if positions_bp is not None:
            x_btd = jnp.take_along_axis(x_btd, positions_bp[..., None], axis=1)
        x_btd = self.attention_norm(x_btd + dropout(a, rate, k_attn_out, deterministic, self.cfg.dropout_rng))
        h = _ACTIVATIONS[self.cfg.hidden_act](self.intermediate(x_btd))
        return self.output_norm(x_btd + dropout(self.output(h), rate, k_out, deterministic, self.cfg.dropout_rng))


class MaskedLMHead(nnx.Module):
    """transform -> activation -> LayerNorm -> decoder tied to the word embeddings (+ bias); `width`: the word
    embeddings' (default: the hidden size); `activation`: the config's hidden_act unless named."""

    def __init__(self, cfg: BertConfig, make: _Factory, width: int | None = None, activation: str | None = None):
        self.cfg, self.activation = cfg, activation or cfg.hidden_act
        self.transform = make.linear(cfg.hidden_size, width or cfg.hidden_size)
        self.norm = make.norm(width)
        self.bias = nnx.Param(jnp.zeros((cfg.vocab_size,), cfg.param_dtype))

    def __call__(self, x_bd, word_embedding_vd):
        h = self.norm(_ACTIVATIONS[self.activation](self.transform(x_bd)))
        w_dv = word_embedding_vd.astype(h.dtype).T
        return dense(h, w_dv, self.bias[...], jnp.dtype(jnp.float32))


class Bert(Encoder):
    """A BERT encoder with the heads of one task.

    task: "base" (returns the last hidden state), "masked-lm" (MLM logits), "pretraining"
    ((MLM logits, NSP logits)) or "sequence-classification" (class logits).

    Stages, for callers that perturb embeddings between them:
      `embed(input_ids)` -> word embeddings (b, t, d);
      `encode(word_embeddings, attention_mask=, token_type_ids=)` -> last hidden state (b, t, d);
      `heads(hidden)` -> the task's output.
    """

    def __init__(self, config: BertConfig, task: str = "base", *, rngs: nnx.Rngs):
        if task not in TASKS:
            raise UserError(f"task={task!r} is not one of {TASKS}.")
        self.config, self.task = config, task
        make = _Factory(config, rngs)
        self.embeddings = Embeddings(config, make)
        if config.scan_layers:  # layers 1 .. L-1 as one Layer whose parameters carry a leading axis (L-1, ...),
            # the last apart: it runs at output positions only, and slicing it off a stack of all L would copy
            # the whole stack in every step (and pad its gradient back in the backward pass)
            states = [nnx.split(Layer(config, make))[1] for _ in range(config.num_hidden_layers - 1)]
            graphdef = nnx.split(Layer(config, _Factory(config, nnx.Rngs(0))))[0]
            self.layers = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)) if states else None
            self.last_layer = Layer(config, make)
        else:
            self.layers = nnx.List([Layer(config, make) for _ in range(config.num_hidden_layers)])
        has_pooler = task in ("base", "pretraining", "sequence-classification")
        self.pooler = make.linear(config.hidden_size, config.hidden_size) if has_pooler else None
        self.mlm = MaskedLMHead(config, make) if task in ("masked-lm", "pretraining") else None
        self.nsp = make.linear(config.hidden_size, 2) if task == "pretraining" else None
        self.classifier = (make.linear(config.hidden_size, config.num_labels)
                           if task in ("sequence-classification", "token-classification") else None)
        self.qa = make.linear(config.hidden_size, 2) if task == "question-answering" else None

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Word embeddings (b, t, d) of token ids (b, t): the point where a perturbation is added."""
        return self.embeddings.word(input_ids)

    def encode(self, word_embeddings: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None, *,
               deterministic: bool = True, dropout_key: jax.Array | None = None,
               output_positions: jax.Array | None = None, collect: dict | None = None) -> jax.Array:
        """Position and token-type embeddings, LayerNorm, then the encoder layers -> (b, t, d).

        word_embeddings (b, t, d); attention_mask, token_type_ids, position_ids (b, t) int, each optional;
        attention_mask may also be (b, t, t): which keys each query sees (several sequences packed in one row).
        With `output_positions` (b, p) the last layer runs only at those positions (its keys and values
        still come from all tokens) and the result is (b, p, d): the same numbers as gathering the full
        output, for less work when only a few positions are read ([CLS], masked tokens).
        `collect`, a dict, receives "hidden": [embeddings, layer 1, ..., layer L] (b, t, d) and "attention":
        [layer 1, ..., layer L] probabilities (b, h, t, t), for distillation.
        """
        cfg = self.config
        _check_dropout_key(deterministic, dropout_key)
        word_embeddings_btd, position_ids_bt = word_embeddings, position_ids
        attention_mask_bt, token_type_ids_bt, output_positions_bp = attention_mask, token_type_ids, output_positions
        b, t, _ = word_embeddings_btd.shape
        if position_ids_bt is None and t > cfg.max_tokens:  # given positions are the caller's
            raise UserError(f"sequence length {t} exceeds the model's {cfg.max_tokens} positions: truncate inputs "
                             "to at most that many tokens.")
        position_ids_bt = self.positions(attention_mask_bt, position_ids_bt, b, t)
        if token_type_ids_bt is None:
            token_type_ids_bt = jnp.zeros((b, t), jnp.int32)
        if attention_mask_bt is None:
            attention_mask_bt = jnp.ones((b, t), jnp.int32)
        emb = self.embeddings
        x = word_embeddings_btd + emb.position(position_ids_bt)
        if emb.token_type is not None:
            x = x + emb.token_type(token_type_ids_bt)
        keys = _keys(dropout_key, cfg.num_hidden_layers + 1)
        x = self.project(dropout(emb.norm(x), cfg.hidden_dropout_prob, keys[0], deterministic, cfg.dropout_rng))
        mask_b1qt = attention_mask_bt[:, None, None, :] if attention_mask_bt.ndim == 2 else attention_mask_bt[:, None]
        bias_b1qt = jnp.where(mask_b1qt > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        last = cfg.num_hidden_layers - 1
        hidden, attention = [x], [] if collect is not None else None
        if cfg.scan_layers:
            return self._scan(x, bias_b1qt, deterministic, keys[1:], output_positions_bp, collect)
        for i, (layer, key) in enumerate(zip(self.layers, keys[1:])):
            x = layer(x, bias_b1qt, deterministic, key, output_positions_bp if i == last else None, attention)
            hidden.append(x)
        if collect is not None:
            collect["hidden"], collect["attention"] = hidden, attention
        return x

    def project(self, x_bte: jax.Array) -> jax.Array:
        """Embeddings into the encoder's width (identity here; ELECTRA projects narrower embeddings)."""
        return x_bte

    def positions(self, attention_mask, position_ids, b: int, t: int) -> jax.Array:
        """Position ids (b, t): 0 .. t-1, or the caller's (an iota, not `arange`: ONNX export traces it with
        symbolic b and t)."""
        return jax.lax.broadcasted_iota(jnp.int32, (b, t), 1) if position_ids is None else position_ids

    def _scan(self, x, bias_b1qt, deterministic, keys, positions_bp, collect):
        """Layers 1 .. L-1 as one lax.scan over the stacked parameters (one layer compiled, whatever the
        depth), then the last layer, which can run at `positions_bp` only."""
        n = self.config.num_hidden_layers
        want = collect is not None
        embeddings, inner, probs = x, [], []
        if n > 1:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, layer_state, key):
                attention = [] if want else None
                y = nnx.merge(graphdef, layer_state)(x, bias_b1qt, deterministic, key, None, attention)
                return y, (y, attention[0] if want else None)

            if self.config.remat != "none":
                policy = jax.checkpoint_policies.dots_saveable if self.config.remat == "dots" else None
                body = jax.checkpoint(body, policy=policy)
            keys_l = None if keys[0] is None else jnp.stack(keys[:n - 1])
            x, (ys, ps) = jax.lax.scan(lambda c, xs: body(c, xs[0], xs[1]), x, (stacked, keys_l),
                                       unroll=bool(self.config.scan_unroll))
            if want:
                inner, probs = [ys[i] for i in range(n - 1)], [ps[i] for i in range(n - 1)]
        last_attention = [] if want else None
        out = self.last_layer(x, bias_b1qt, deterministic, keys[n - 1], positions_bp, last_attention)
        if want:
            collect["hidden"] = [embeddings, *inner, out]
            collect["attention"] = [*probs, *last_attention]
        return out

    def pool(self, hidden_btd: jax.Array) -> jax.Array:
        """tanh(dense(hidden[:, 0])) -> (b, d)."""
        return jnp.tanh(self.pooler(hidden_btd[:, 0]))

    def mlm_logits(self, hidden_btd: jax.Array) -> jax.Array:
        """Vocabulary logits (..., v) in float32 for any leading shape of hidden states."""
        return self.mlm(hidden_btd, self.embeddings.word.embedding[...])

    def nsp_logits(self, hidden_btd: jax.Array) -> jax.Array:
        return self.nsp(self.pool(hidden_btd)).astype(jnp.float32)

    def token_dropout(self) -> float:
        cfg = self.config
        return cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout

    def classify_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                        dropout_key: jax.Array | None = None, attention_mask: jax.Array | None = None) -> jax.Array:
        _check_dropout_key(deterministic, dropout_key)
        cfg = self.config
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = dropout(self.pool(hidden_btd), rate, dropout_key, deterministic, cfg.dropout_rng)
        return self.classifier(pooled).astype(jnp.float32)

    def dense_head_logits(self, hidden_btd: jax.Array, activation, deterministic: bool,
                          dropout_key: jax.Array | None) -> jax.Array:
        """RoBERTa / ELECTRA's classification head on [CLS]: dropout -> dense (our pooler) -> `activation` ->
        dropout -> out_proj (our classifier)."""
        _check_dropout_key(deterministic, dropout_key)
        cfg = self.config
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        k_in, k_out = _keys(dropout_key, 2)
        x = dropout(hidden_btd[:, 0], rate, k_in, deterministic, cfg.dropout_rng)
        x = dropout(activation(self.pooler(x)), rate, k_out, deterministic, cfg.dropout_rng)
        return self.classifier(x).astype(jnp.float32)
