"""DeBERTa-v2 / v3 in Flax NNX (He et al. 2021): disentangled self-attention.

scores(q, k) = [Q_q . K_k + Q_q . Kr_{d(q,k)} + K_k . Qr_{d(k,q)}] / sqrt(3 head_dim), where Kr, Qr are the
relative-position embeddings (LayerNorm'd when `norm_rel_ebd` says so) projected by the position key / query
projections (the content ones with `share_att_key`, as in v3), and d() maps a distance to one of 2 * span
slots (log buckets with `position_buckets`). Embeddings: words (+ absolute positions when
`position_biased_input`) (+ token types), projected without bias when narrower, LayerNorm, zeroed at padding.
The padding mask is the outer product of the input mask with itself (padded queries see nothing and get a
uniform row), as transformers computes it. Packed rows (a (b, t, t) mask of contiguous blocks, positions
restarting per block) give each block what it gives alone: relative distances inside a block are the row's.
Heads: sequence classification (ContextPooler: dense -> `pooler_hidden_act` on [CLS], then the classifier)
and masked LM (dense to the embedding width -> activation -> LayerNorm -> the word embeddings tied as decoder,
plus a bias: BERT's head; transformers keeps it under two names, `cls.predictions` when `legacy`, else
`lm_predictions.lm_head`). The convolution layer of the v2 xlarge models (`conv_kernel_size` > 0): a 1-D
convolution over the embeddings, zeroed at padding, `conv_act`, added to the first layer's output and
LayerNorm'd. Not supported: z_steps, scanned layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm.errors import UserError
from jaxopt_llm.models.bert.modeling import BertConfig, MaskedLMHead, _Factory
from jaxopt_llm.models.layers import _ACTIVATIONS, Encoder, _check_dropout_key, _keys, dropout

TASKS = ("base", "masked-lm", "sequence-classification", "token-classification", "question-answering")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config(BertConfig):
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-7
    embedding_size: int | None = None
    relative_attention: bool = False
    position_buckets: int = -1
    max_relative_positions: int = -1
    share_att_key: bool = False
    pos_att_type: tuple[str, ...] = ()
    position_biased_input: bool = True
    norm_rel_ebd: str = "none"
    pooler_hidden_act: str = "gelu"
    pooler_dropout: float = 0.0
    conv_kernel_size: int = 0  # > 0: the convolution layer after the first layer (DeBERTa-v2 xlarge)
    conv_groups: int = 1
    conv_act: str = "tanh"
    legacy: bool = True  # transformers' name for the masked-LM head's keys (cls.predictions, else lm_predictions)

    MODEL_TYPE: ClassVar[str] = "deberta-v2"
    HF_CONFIG: ClassVar[str] = "DebertaV2Config"
    _EXTRA: ClassVar[tuple[str, ...]] = ("embedding_size", "relative_attention", "position_buckets",
                                         "max_relative_positions", "share_att_key", "position_biased_input",
                                         "norm_rel_ebd", "pooler_hidden_act", "pooler_dropout", "legacy",
                                         "conv_kernel_size", "conv_groups", "conv_act")

    def __post_init__(self):
        super().__post_init__()
        if self.scan_layers:
            raise UserError("DebertaV2Config.scan_layers=True: DeBERTa's layers run unrolled; set it to false.")
        if self.conv_kernel_size and self.conv_act not in _ACTIVATIONS:
            raise UserError(f"DebertaV2Config.conv_act={self.conv_act!r}: use one of {sorted(_ACTIVATIONS)}.")
        if self.conv_kernel_size and self.conv_kernel_size % 2 == 0:
            raise UserError(f"DebertaV2Config.conv_kernel_size={self.conv_kernel_size}: an odd size keeps the length.")
        bad = sorted(set(self.pos_att_type) - {"c2p", "p2c"})
        if bad:
            raise UserError(f"DebertaV2Config.pos_att_type has {bad}: use c2p and / or p2c.")

    @property
    def span(self) -> int:
        """Relative-position slots on each side: the buckets, else the maximum distance."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions > 0 else self.max_position_embeddings

    @property
    def max_distance(self) -> int:
        return self.max_relative_positions if self.max_relative_positions > 0 else self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, hf: Any, **changes: Any) -> DebertaV2Config:
        d = dict(hf if isinstance(hf, dict) else hf.to_dict())
        if d.get("z_steps", 0) > 1:
            raise UserError(f"z_steps={d['z_steps']} is not supported.")
        config = super().from_hf_config(d, **changes)
        extra = {k: d[k] for k in cls._EXTRA if d.get(k) is not None}
        kinds = d.get("pos_att_type") or ()
        kinds = tuple(x.strip() for x in kinds.lower().split("|")) if isinstance(kinds, str) else tuple(kinds)
        if extra.get("embedding_size") == config.hidden_size:
            extra["embedding_size"] = None
        return config.replace(**extra, pos_att_type=tuple(k for k in kinds if k))

    def to_hf_config(self, architectures: tuple[str, ...] = ()) -> Any:
        hf = super().to_hf_config(architectures)
        for k in self._EXTRA:
            setattr(hf, k, getattr(self, k))
        hf.embedding_size = self.embedding_size or self.hidden_size
        hf.pos_att_type = list(self.pos_att_type)
        return hf

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings


def log_buckets(relative: np.ndarray, buckets: int, max_position: int) -> np.ndarray:
    """transformers' make_log_bucket_position: distances within buckets // 2 as they are, longer ones on a
    log scale up to `max_position`."""
    sign = np.sign(relative)
    mid = buckets // 2
    absolute = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative)).astype(np.float64)
    log_pos = np.ceil(np.log(absolute / mid) / np.log((max_position - 1) / mid) * (mid - 1)) + mid
    return np.where(absolute <= mid, relative, log_pos * sign).astype(np.int32)


def relative_positions(t: int, cfg: DebertaV2Config) -> np.ndarray:
    """(t, t) query - key distances, bucketed as the config says (static: a numpy constant per length)."""
    rel = np.arange(t)[:, None] - np.arange(t)[None, :]
    if cfg.position_buckets > 0 and cfg.max_distance > 0:
        rel = log_buckets(rel, cfg.position_buckets, cfg.max_distance)
    return rel.astype(np.int32)


class Attention(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, make: _Factory):
        self.cfg = cfg
        d = cfg.hidden_size
        self.query, self.key, self.value, self.out = (make.linear(d, d) for _ in range(4))
        separate = cfg.relative_attention and not cfg.share_att_key
        self.pos_key = make.linear(d, d) if separate and "c2p" in cfg.pos_att_type else None
        self.pos_query = make.linear(d, d) if separate and "p2c" in cfg.pos_att_type else None
        self.norm = make.norm()

    def __call__(self, x_btd, keep_b1tt, rel_embeddings, deterministic, key, collect=None):
        cfg = self.cfg
        b, t, d = x_btd.shape
        n, k = cfg.num_attention_heads, cfg.head_dim
        heads = lambda y: y.reshape(*y.shape[:-1], n, k)  # noqa: E731
        q_bthk, k_bthk, v_bthk = heads(self.query(x_btd)), heads(self.key(x_btd)), heads(self.value(x_btd))
        factor = 1 + len(cfg.pos_att_type)
        scale = math.sqrt(k * factor)
        scores = jnp.einsum("bqhk,bshk->bhqs", q_bthk, k_bthk, preferred_element_type=jnp.float32) / scale
        k_attn, k_pos = _keys(key, 2)
        if cfg.relative_attention:
            span = cfg.span
            rel = relative_positions(t, cfg)
            r = dropout(rel_embeddings[:2 * span], cfg.hidden_dropout_prob, k_pos, deterministic, cfg.dropout_rng)
            if "c2p" in cfg.pos_att_type:
                pk_rhk = heads((self.key if cfg.share_att_key else self.pos_key)(r))
                c2p_bhqr = jnp.einsum("bqhk,rhk->bhqr", q_bthk, pk_rhk, preferred_element_type=jnp.float32)
                index = np.clip(rel + span, 0, 2 * span - 1)
                scores = scores + jnp.take_along_axis(c2p_bhqr, jnp.asarray(index)[None, None], axis=-1) / scale
            if "p2c" in cfg.pos_att_type:
                pq_rhk = heads((self.query if cfg.share_att_key else self.pos_query)(r))
                p2c_bhsr = jnp.einsum("bshk,rhk->bhsr", k_bthk, pq_rhk, preferred_element_type=jnp.float32)
                index = np.clip(-rel + span, 0, 2 * span - 1)  # [key s, query q]
                p2c_bhsq = jnp.take_along_axis(p2c_bhsr, jnp.asarray(index)[None, None], axis=-1)
                scores = scores + jnp.swapaxes(p2c_bhsq, -1, -2) / scale
        scores = jnp.where(keep_b1tt, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_bthk.dtype)
        if collect is not None:
            collect.append(probs)
        probs = dropout(probs, cfg.attention_probs_dropout_prob, k_attn, deterministic, cfg.dropout_rng)
        ctx = jnp.einsum("bhqs,bshk->bqhk", probs, v_bthk).reshape(b, t, d)
        return ctx


class Layer(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, make: _Factory):
        self.cfg = cfg
        self.attention = Attention(cfg, make)
        self.intermediate = make.linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = make.linear(cfg.intermediate_size, cfg.hidden_size)
        self.output_norm = make.norm()

    def __call__(self, x_btd, keep_b1tt, rel_embeddings, deterministic, key, collect=None, read_bp=None):
        """-> (b, t, d), or (b, p, d) at the positions `read_bp` only (the attention output projection and the
        feed-forward run there alone)."""
        k_attn, k_attn_out, k_out = _keys(key, 3)
        rate, rng = self.cfg.hidden_dropout_prob, self.cfg.dropout_rng
        a = self.attention(x_btd, keep_b1tt, rel_embeddings, deterministic, k_attn, collect)
        if read_bp is not None:
            a = jnp.take_along_axis(a, read_bp[..., None], axis=1)
            x_btd = jnp.take_along_axis(x_btd, read_bp[..., None], axis=1)
        x_btd = self.attention.norm(x_btd + dropout(self.attention.out(a), rate, k_attn_out, deterministic, rng))
        h = _ACTIVATIONS[self.cfg.hidden_act](self.intermediate(x_btd))
        return self.output_norm(x_btd + dropout(self.output(h), rate, k_out, deterministic, rng))


class Embeddings(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, make: _Factory):
        width = cfg.embedding_size or cfg.hidden_size
        self.word = make.embed(cfg.vocab_size, width)
        self.position = make.embed(cfg.max_position_embeddings, width) if cfg.position_biased_input else None
        self.token_type = make.embed(cfg.type_vocab_size, width) if cfg.type_vocab_size else None
        self.project = (nnx.Linear(width, cfg.hidden_size, use_bias=False, kernel_init=make.init, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, rngs=make.rngs)
                        if width != cfg.hidden_size else None)
        self.norm = make.norm()


class Conv(nnx.Module):
    """transformers' ConvLayer: conv1d over the embeddings, zeroed at padding, activation, added to the first
    layer's output, LayerNorm, zeroed at padding."""

    def __init__(self, cfg: DebertaV2Config, make: _Factory):
        k, d = cfg.conv_kernel_size, cfg.hidden_size
        self.act = cfg.conv_act
        self.conv = nnx.Conv(d, d, kernel_size=(k,), padding=[((k - 1) // 2, (k - 1) // 2)],
                             feature_group_count=cfg.conv_groups, kernel_init=make.init, dtype=cfg.dtype,
                             param_dtype=cfg.param_dtype, rngs=make.rngs)
        self.norm = make.norm()

    def __call__(self, embeddings_btd, layer_btd, real_bt, rate, key, deterministic, rng):
        keep = real_bt[..., None].astype(layer_btd.dtype)
        out = dropout(self.conv(embeddings_btd) * keep, rate, key, deterministic, rng)
        return self.norm(layer_btd + _ACTIVATIONS[self.act](out)) * keep


class DebertaV2(Encoder):
    """A DeBERTa-v2 / v3 encoder with the heads of one task (base, masked-lm or sequence-classification), with
    the encoder protocol of `Bert` (embed, encode, heads, classify_logits, mlm_logits)."""

    def __init__(self, config: DebertaV2Config, task: str = "base", *, rngs: nnx.Rngs):
        if task not in TASKS:
            raise UserError(f"task={task!r}: DeBERTa-v2 supports {TASKS}.")
        self.config, self.task = config, task
        make = _Factory(config, rngs)
        self.embeddings = Embeddings(config, make)
        self.layers = nnx.List([Layer(config, make) for _ in range(config.num_hidden_layers)])
        self.relative = make.embed(2 * config.span) if config.relative_attention else None
        self.relative_norm = make.norm() if config.relative_attention and "layer_norm" in config.norm_rel_ebd else None
        self.conv = Conv(config, make) if config.conv_kernel_size > 0 else None
        is_classifier = task == "sequence-classification"
        self.pooler = make.linear(config.hidden_size, config.hidden_size) if is_classifier else None
        tagger = task == "token-classification"
        self.classifier = make.linear(config.hidden_size, config.num_labels) if is_classifier or tagger else None
        self.qa = make.linear(config.hidden_size, 2) if task == "question-answering" else None
        width = config.embedding_size or config.hidden_size
        if task == "masked-lm" and not config.legacy and width != config.hidden_size:
            raise UserError(f"legacy=False with embedding_size={width} != hidden_size={config.hidden_size}: "
                            "transformers' non-legacy masked-LM head needs equal sizes; set legacy=True.")
        self.mlm = MaskedLMHead(config, make, width) if task == "masked-lm" else None

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embeddings.word(input_ids)

    def encode(self, word_embeddings, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True, dropout_key=None, output_positions=None, collect=None):
        cfg = self.config
        _check_dropout_key(deterministic, dropout_key)
        b, t, _ = word_embeddings.shape
        if t > cfg.max_tokens and cfg.position_biased_input and position_ids is None:
            raise UserError(f"sequence length {t} exceeds the model's {cfg.max_tokens} positions: truncate inputs "
                             "to at most that many tokens.")
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if attention_mask.ndim == 3 and self.conv is not None:
            raise UserError("DeBERTa's convolution layer (conv_kernel_size) would mix neighbouring blocks of packed "
                            "rows: run such a model on one text per row (not a cloze prompt).")
        if attention_mask.ndim == 3:  # packed rows: the keys each query sees; a token is real if it sees itself
            real = jnp.diagonal(attention_mask, axis1=1, axis2=2) > 0
            keep_b1tt = (attention_mask > 0)[:, None] & real[:, None, :, None]
        else:
            real = attention_mask > 0
            keep_b1tt = real[:, None, :, None] & real[:, None, None, :]
        emb = self.embeddings
        x = word_embeddings
        if emb.position is not None:
            x = x + emb.position(jax.lax.broadcasted_iota(jnp.int32, (b, t), 1) if position_ids is None else position_ids)
        if emb.token_type is not None:
            x = x + emb.token_type(jnp.zeros((b, t), jnp.int32) if token_type_ids is None else token_type_ids)
        if emb.project is not None:
            x = emb.project(x)
        keys = _keys(dropout_key, cfg.num_hidden_layers + 1)
        x = emb.norm(x) * real[..., None].astype(x.dtype)
        x = dropout(x, cfg.hidden_dropout_prob, keys[0], deterministic, cfg.dropout_rng)
        rel = None
        if self.relative is not None:
            rel = self.relative.embedding[...]
            if self.relative_norm is not None:
                rel = self.relative_norm(rel)
        hidden, attention = [x], [] if collect is not None else None
        last = len(self.layers) - 1
        read = output_positions if collect is None else None  # the last layer runs at the positions read
        for i, (layer, key) in enumerate(zip(self.layers, keys[1:])):
            if i == 0 and self.conv is not None:  # the convolution reads the embeddings: layer 0 runs in full
                k_layer, k_conv = _keys(key, 2)
                x = self.conv(x, layer(x, keep_b1tt, rel, deterministic, k_layer, attention), real,
                              cfg.hidden_dropout_prob, k_conv, deterministic, cfg.dropout_rng)
                if read is not None and i == last:
                    x = jnp.take_along_axis(x, read[..., None], axis=1)
            else:
                x = layer(x, keep_b1tt, rel, deterministic, key, attention, read if i == last else None)
            hidden.append(x)
        if collect is not None:
            collect["hidden"], collect["attention"] = hidden, attention
        if output_positions is not None and read is None:
            x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
        return x

    def classify_logits(self, hidden_btd, *, deterministic: bool = True, dropout_key=None, attention_mask=None):
        _check_dropout_key(deterministic, dropout_key)
        cfg = self.config
        k_in, k_out = _keys(dropout_key, 2)
        x = dropout(hidden_btd[:, 0], cfg.pooler_dropout, k_in, deterministic, cfg.dropout_rng)
        x = _ACTIVATIONS[cfg.pooler_hidden_act](self.pooler(x))
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        return self.classifier(dropout(x, rate, k_out, deterministic, cfg.dropout_rng)).astype(jnp.float32)

    def mlm_logits(self, hidden_btd):
        """Vocabulary logits (..., v) in float32."""
        return self.mlm(hidden_btd, self.embeddings.word.embedding[...])

    def token_dropout(self) -> float:
        return self.config.hidden_dropout_prob  # DebertaV2ForTokenClassification drops with hidden_dropout_prob
