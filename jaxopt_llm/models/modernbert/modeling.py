"""ModernBERT in Flax NNX (Warner et al. 2024).

Pre-norm layers (no norm before the first layer's attention), no biases unless the config asks for them,
rotary position embeddings (theta per layer type), a GeGLU feed-forward (act(x W_in) * (x W_gate)), and
attention that is global in every `global_attn_every_n_layers`-th layer and local elsewhere: a query sees the
keys within `local_attention // 2` positions. Local layers compute only that band (`banded_attention`:
blocks of half a window, each query block against its own and its two neighbours' keys, 3 * half scores per
query instead of t); `attn_implementation="eager"` masks the full score matrix instead (the same numbers,
kept as the reference the benchmark compares against). Packed rows (a (b, t, t) mask of contiguous blocks,
`position_ids` restarting per block) take the full-matrix path; distances inside a block are the row's.
Unpadded execution (`unpad` > 0, as transformers does with its flash-attention path): every layer's
projections, norms and MLP run on the real tokens alone, gathered into a buffer of `unpad` times the batch's
token slots; attention scatters them back to (b, t) rows. A batch with more real tokens than the buffer holds
takes the padded path (`lax.cond`: both are compiled, one runs). The two give the same numbers at real tokens,
dropout included (`dropout_rows`); positions of padding hold zeros. Under `vmap` over batches (an ensemble's
members) the condition is batched and both paths run: keep `unpad` off there.
Heads: the prediction head (dense -> activation -> LayerNorm) then the tied decoder for masked LM, or [CLS]
pooling -> head -> classifier.
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
from jaxopt_llm.models.bert.modeling import BertConfig
from jaxopt_llm.models.layers import (
    _ACTIVATIONS,
    Encoder,
    Linear,
    _check_dropout_key,
    _keys,
    attention,
    dropout,
    dropout_rows,
)

TASKS = ("base", "masked-lm", "sequence-classification", "token-classification", "question-answering")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig(BertConfig):
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"
    local_attention: int = 128
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    classifier_pooling: str = "cls"
    attn_implementation: str = "banded"  # local layers: "banded" (the band only) | "eager" (full matrix, masked)
    unpad: float = 0.0  # > 0: layers run on the real tokens, in a buffer of this fraction of a batch's b * t slots

    MODEL_TYPE: ClassVar[str] = "modernbert"
    HF_CONFIG: ClassVar[str] = "ModernBertConfig"
    _EXTRA: ClassVar[tuple[str, ...]] = ("local_attention", "norm_bias", "attention_bias", "mlp_bias", "decoder_bias",
                                         "classifier_bias", "classifier_activation", "classifier_pooling")

    def __post_init__(self):
        super().__post_init__()
        if self.scan_layers:
            raise UserError("ModernBertConfig.scan_layers=True: ModernBERT's layers run unrolled; set it to false.")
        if self.classifier_pooling not in ("cls", "mean"):
            raise UserError(f"classifier_pooling={self.classifier_pooling!r}: use 'cls' or 'mean'.")
        if self.attn_implementation not in ("banded", "eager"):
            raise UserError(f"attn_implementation={self.attn_implementation!r}: use 'banded' or 'eager'.")
        if not 0.0 <= self.unpad <= 1.0:
            raise UserError(f"unpad={self.unpad}: the unpadded buffer is a fraction of a batch's token slots, "
                            "between 0 (off) and 1; 0.5 suits batches about a third full.")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise UserError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers.")

    @classmethod
    def from_hf_config(cls, hf: Any, **changes: Any) -> ModernBertConfig:
        d = dict(hf if isinstance(hf, dict) else hf.to_dict())
        d["hidden_act"] = d.get("hidden_activation", "gelu")
        d["layer_norm_eps"] = d.get("norm_eps", 1e-5)
        d["hidden_dropout_prob"] = d.get("mlp_dropout", 0.0)
        d["attention_probs_dropout_prob"] = d.get("attention_dropout", 0.0)
        d["type_vocab_size"] = 0
        config = super().from_hf_config(d, **changes)
        rope = d.get("rope_parameters") or {}
        every = d.get("global_attn_every_n_layers", 3)
        types = d.get("layer_types") or ["sliding_attention" if i % every else "full_attention"
                                         for i in range(config.num_hidden_layers)]
        extra = {k: d[k] for k in cls._EXTRA if d.get(k) is not None}
        full = rope.get("full_attention", {}).get("rope_theta", d.get("global_rope_theta", 160000.0))
        local = rope.get("sliding_attention", {}).get("rope_theta", d.get("local_rope_theta", 10000.0))
        return config.replace(**extra, layer_types=tuple(types), global_rope_theta=float(full),
                              local_rope_theta=float(local))

    def to_hf_config(self, architectures: tuple[str, ...] = ()) -> Any:
        import transformers

        names = self.label_names
        return transformers.ModernBertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            hidden_activation=self.hidden_act, max_position_embeddings=self.max_position_embeddings,
            initializer_range=self.initializer_range, norm_eps=self.layer_norm_eps, pad_token_id=self.pad_token_id,
            attention_dropout=self.attention_probs_dropout_prob, mlp_dropout=self.hidden_dropout_prob,
            layer_types=list(self.layer_types), classifier_dropout=self.classifier_dropout or 0.0,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}},
            **{k: getattr(self, k) for k in self._EXTRA}, architectures=list(architectures) or None,
            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})

    @property
    def kinds(self) -> tuple[str, ...]:
        return self.layer_types or tuple("sliding_attention" if i % 3 else "full_attention"
                                         for i in range(self.num_hidden_layers))


class _Make:
    def __init__(self, cfg: ModernBertConfig, rngs: nnx.Rngs):
        self.cfg, self.rngs = cfg, rngs
        self.init = nnx.initializers.normal(cfg.initializer_range)

    def linear(self, n_in: int, n_out: int, bias: bool) -> nnx.Linear:
        return Linear(n_in, n_out, use_bias=bias, kernel_init=self.init, dtype=self.cfg.dtype,
                          param_dtype=self.cfg.param_dtype, rngs=self.rngs)

    def norm(self) -> nnx.LayerNorm:
        return nnx.LayerNorm(self.cfg.hidden_size, epsilon=self.cfg.layer_norm_eps, use_bias=self.cfg.norm_bias,
                             dtype=self.cfg.dtype, param_dtype=self.cfg.param_dtype, use_fast_variance=False,
                             rngs=self.rngs)


def rotary(x_bthk: jax.Array, theta: float, positions_bt: jax.Array | None = None) -> jax.Array:
    """Rotary position embedding at `positions_bt` (default 0 .. t-1) (rotate_half layout), in float32."""
    t, k = x_bthk.shape[1], x_bthk.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, k, 2, dtype=np.float32) / k))
    if positions_bt is None:  # a constant of the program
        emb = np.concatenate([np.arange(t, dtype=np.float32)[:, None] * inv[None]] * 2, -1)
        cos, sin = jnp.asarray(np.cos(emb))[None, :, None], jnp.asarray(np.sin(emb))[None, :, None]
    else:
        freqs = positions_bt.astype(jnp.float32)[..., None] * inv
        emb = jnp.concatenate([freqs, freqs], -1)[:, :, None]
        cos, sin = jnp.cos(emb), jnp.sin(emb)
    x = x_bthk.astype(jnp.float32)
    half = jnp.concatenate([-x[..., k // 2:], x[..., :k // 2]], -1)
    return (x * cos + half * sin).astype(x_bthk.dtype)


def banded_attention(q_bthk, k_bthk, v_bthk, keep_bt, half, rate, key, deterministic, rng):
    """Attention of each query to the keys within `half` positions, computing only that band.

    The sequence is cut into blocks of `half` (padded at both ends with one masked block); the queries of block j
    score the keys of blocks j - 1, j, j + 1, which hold every key within `half` of them, and the exact distance
    mask is applied there. Returns (b, t, h, k), equal to the full masked computation."""
    b, t, h, kd = q_bthk.shape
    n = -(-t // half)
    pad = n * half - t

    def blocks(x):  # (b, t, ...) -> (b, n + 2, half, ...) with a masked block on each side
        x = jnp.pad(x, [(0, 0), (half, pad + half)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n + 2, half, *x.shape[2:])

    def neighbours(x):  # (b, n + 2, half, ...) -> (b, n, 3 half, ...)
        return jnp.concatenate([x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=2)

    q = blocks(q_bthk)[:, 1:-1]  # (b, n, half, h, k)
    kk, v = neighbours(blocks(k_bthk)), neighbours(blocks(v_bthk))  # (b, n, 3 half, h, k)
    keep = neighbours(blocks(keep_bt))  # (b, n, 3 half)
    offset = np.arange(3 * half)[None, :] - half - np.arange(half)[:, None]  # key - query position
    keep = keep[:, :, None, None, :] & jnp.asarray(np.abs(offset) <= half)[None, None, None]  # (b, n, 1, q, s)
    scores = jnp.einsum("bnqhk,bnshk->bnhqs", q, kk, preferred_element_type=jnp.float32) / math.sqrt(kd)
    probs = jax.nn.softmax(jnp.where(keep, scores, jnp.finfo(jnp.float32).min), -1).astype(v.dtype)
    probs = dropout(probs, rate, key, deterministic, rng)
    out = jnp.einsum("bnhqs,bnshk->bnqhk", probs, v).reshape(b, n * half, h, kd)
    return out[:, :t]


class Layer(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, make: _Make, index: int):
        self.cfg, self.local = cfg, cfg.kinds[index] == "sliding_attention"
        self.attn_norm = make.norm() if index else None
        self.wqkv = make.linear(cfg.hidden_size, 3 * cfg.hidden_size, cfg.attention_bias)
        self.out = make.linear(cfg.hidden_size, cfg.hidden_size, cfg.attention_bias)
        self.mlp_norm = make.norm()
        self.wi = make.linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias)
        self.wo = make.linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)

    def heads(self, qkv_bt3hk, positions_bt=None):
        """(q, k, v) (b, t, h, k) of the fused projection, queries and keys rotated with the layer's theta."""
        theta = self.cfg.local_rope_theta if self.local else self.cfg.global_rope_theta
        return (rotary(qkv_bt3hk[:, :, 0], theta, positions_bt), rotary(qkv_bt3hk[:, :, 1], theta, positions_bt),
                qkv_bt3hk[:, :, 2])

    def attend(self, q_bthk, k_bthk, v_bthk, keep_b1qt, deterministic, key, collect):
        """(b, t, h, k): the band alone in a local layer (`banded_attention`) where the mask is per key and
        nothing is collected; else the score matrix, masked to the band in a local layer, through the fused
        kernel when there is no attention dropout."""
        cfg, t = self.cfg, q_bthk.shape[1]
        half, rate = cfg.local_attention // 2, cfg.attention_probs_dropout_prob
        per_key = keep_b1qt.shape[2] == 1  # not packed rows (a mask per query)
        if self.local and per_key and collect is None and cfg.attn_implementation == "banded" and t > 2 * half:
            return banded_attention(q_bthk, k_bthk, v_bthk, keep_b1qt[:, 0, 0], half, rate, key, deterministic,
                                    cfg.dropout_rng)
        keep = keep_b1qt
        if self.local:
            distance = np.abs(np.arange(t)[:, None] - np.arange(t)[None, :])
            keep = keep & jnp.asarray(distance <= half)[None, None]
        scale = 1.0 / math.sqrt(q_bthk.shape[-1])
        if collect is None and (deterministic or rate == 0.0):
            return attention(q_bthk, k_bthk, v_bthk, jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min), scale)
        scores = jnp.einsum("bqhk,bshk->bhqs", q_bthk, k_bthk, preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(jnp.where(keep, scores, jnp.finfo(jnp.float32).min), -1).astype(v_bthk.dtype)
        if collect is not None:
            collect.append(probs)
        probs = dropout(probs, rate, key, deterministic, cfg.dropout_rng)
        return jnp.einsum("bhqs,bshk->bqhk", probs, v_bthk)

    def __call__(self, x_btd, keep_b1qt, deterministic, key, collect=None, positions_bt=None, read_bp=None):
        """-> (b, t, d), or (b, p, d) at the positions `read_bp` only (the output projection and the MLP run
        there alone; keys and values come from every token)."""
        cfg = self.cfg
        b, t, d = x_btd.shape
        n, k = cfg.num_attention_heads, cfg.head_dim
        k_attn, k_out, k_mlp = _keys(key, 3)
        h = x_btd if self.attn_norm is None else self.attn_norm(x_btd)
        q, kk, v = self.heads(self.wqkv(h).reshape(b, t, 3, n, k), positions_bt)
        out = self.attend(q, kk, v, keep_b1qt, deterministic, k_attn, collect).reshape(b, t, d)
        if read_bp is not None:
            out = jnp.take_along_axis(out, read_bp[..., None], axis=1)
            x_btd = jnp.take_along_axis(x_btd, read_bp[..., None], axis=1)

        def drop(x, rate, key):
            return dropout(x, rate, key, deterministic, cfg.dropout_rng)

        return self.mlp(x_btd, out, k_out, k_mlp, drop)

    def mlp(self, x, attended, k_out, k_mlp, drop):
        """The output projection's residual, then the GeGLU MLP's, on x (..., d); `drop(x, rate, key)`."""
        cfg = self.cfg
        x = x + drop(self.out(attended), cfg.attention_probs_dropout_prob, k_out)
        gate_in, gate = jnp.split(self.wi(self.mlp_norm(x)), 2, axis=-1)
        return x + self.wo(drop(_ACTIVATIONS[cfg.hidden_act](gate_in) * gate, cfg.hidden_dropout_prob, k_mlp))

    def unpadded(self, x_nd, rows_n, b, t, keep_b1qt, deterministic, key, positions_bt=None):
        """`__call__` on the real tokens: x_nd holds rows `rows_n` of the (b * t, d) hidden states (filler rows
        index b * t); attention sees them scattered back to (b, t). -> (n, d)."""
        cfg = self.cfg
        d = x_nd.shape[-1]
        n, k = cfg.num_attention_heads, cfg.head_dim
        k_attn, k_out, k_mlp = _keys(key, 3)
        h = x_nd if self.attn_norm is None else self.attn_norm(x_nd)
        q, kk, v = self.heads(_scatter(self.wqkv(h), rows_n, b * t).reshape(b, t, 3, n, k), positions_bt)
        out = self.attend(q, kk, v, keep_b1qt, deterministic, k_attn, None).reshape(b * t, d)

        def drop(x, rate, key):
            return dropout_rows(x, rows_n, (b, t, x.shape[-1]), rate, key, deterministic, cfg.dropout_rng)

        return self.mlp(x_nd, out.at[rows_n].get(mode="fill", fill_value=0), k_out, k_mlp, drop)


def _scatter(values_nc, rows_n, size):
    """(size, c) zeros with `values_nc` at `rows_n` (rows >= size are dropped)."""
    return jnp.zeros((size, values_nc.shape[-1]), values_nc.dtype).at[rows_n].set(values_nc, mode="drop")


class Head(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, make: _Make):
        self.dense = make.linear(cfg.hidden_size, cfg.hidden_size, cfg.classifier_bias)
        self.norm = make.norm()
        self.act = cfg.classifier_activation

    def __call__(self, x):
        return self.norm(_ACTIVATIONS[self.act](self.dense(x)))


class ModernBert(Encoder):
    """A ModernBERT encoder with the heads of one task, with the encoder protocol of `Bert`."""

    def __init__(self, config: ModernBertConfig, task: str = "base", *, rngs: nnx.Rngs):
        if task not in TASKS:
            raise UserError(f"task={task!r}: ModernBERT supports {TASKS}.")
        self.config, self.task = config, task
        make = _Make(config, rngs)
        self.word = nnx.Embed(config.vocab_size, config.hidden_size, embedding_init=make.init, dtype=config.dtype,
                              param_dtype=config.param_dtype, rngs=rngs)
        self.embedding_norm = make.norm()
        self.layers = nnx.List([Layer(config, make, i) for i in range(config.num_hidden_layers)])
        self.final_norm = make.norm()
        self.head = Head(config, make) if task != "base" else None
        self.decoder_bias = (nnx.Param(jnp.zeros((config.vocab_size,), config.param_dtype))
                             if task == "masked-lm" and config.decoder_bias else None)
        is_classifier = task in ("sequence-classification", "token-classification", "question-answering")
        outputs = 2 if task == "question-answering" else config.num_labels  # QA: start and end
        self.classifier = make.linear(config.hidden_size, outputs, True) if is_classifier else None

    @property
    def mlm(self):
        """The masked-LM head (the prediction head of a masked-LM model), or None."""
        return self.head if self.task == "masked-lm" else None

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.word(input_ids)

    def encode(self, word_embeddings, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True, dropout_key=None, output_positions=None, collect=None):
        cfg = self.config
        _check_dropout_key(deterministic, dropout_key)
        b, t, _ = word_embeddings.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        keys = _keys(dropout_key, cfg.num_hidden_layers + 1)
        capacity = self.capacity(b, t) if attention_mask.ndim == 2 and collect is None else None
        if capacity is not None:
            def unpadded(x, mask, positions, keys):
                return self._unpadded(x, mask, positions, deterministic, keys, output_positions, capacity)

            def padded(x, mask, positions, keys):
                return self._padded(x, mask, positions, deterministic, keys, output_positions, None)

            return jax.lax.cond((attention_mask > 0).sum() <= capacity, unpadded, padded, word_embeddings,
                                attention_mask, position_ids, keys)
        return self._padded(word_embeddings, attention_mask, position_ids, deterministic, keys, output_positions,
                            collect)

    def capacity(self, b: int, t: int) -> int | None:
        """The unpadded buffer's rows for a (b, t) batch (a multiple of 8), or None: padded execution."""
        if not self.config.unpad:
            return None
        rows = -(-math.ceil(self.config.unpad * b * t) // 8) * 8
        return rows if rows < b * t else None

    def _unpadded(self, word_embeddings, attention_mask, position_ids, deterministic, keys, output_positions,
                  capacity):
        cfg = self.config
        b, t, d = word_embeddings.shape
        rows = jnp.nonzero(attention_mask.reshape(-1) > 0, size=capacity, fill_value=b * t)[0]
        x = word_embeddings.reshape(b * t, d).at[rows].get(mode="fill", fill_value=0)
        x = dropout_rows(self.embedding_norm(x), rows, (b, t, d), cfg.hidden_dropout_prob, keys[0], deterministic,
                         cfg.dropout_rng)
        keep_b1qt = (attention_mask > 0)[:, None, None, :]
        for layer, key in zip(self.layers, keys[1:]):
            x = layer.unpadded(x, rows, b, t, keep_b1qt, deterministic, key, position_ids)
        x = _scatter(self.final_norm(x), rows, b * t).reshape(b, t, d)
        return x if output_positions is None else jnp.take_along_axis(x, output_positions[..., None], axis=1)

    def _padded(self, word_embeddings, attention_mask, position_ids, deterministic, keys, output_positions, collect):
        cfg = self.config
        x = dropout(self.embedding_norm(word_embeddings), cfg.hidden_dropout_prob, keys[0], deterministic,
                    cfg.dropout_rng)
        if attention_mask.ndim == 3:  # packed rows: the keys each query sees (contiguous blocks)
            keep_b1qt = (attention_mask > 0)[:, None]
        else:
            keep_b1qt = (attention_mask > 0)[:, None, None, :]
        hidden, attention = [x], [] if collect is not None else None
        last = len(self.layers) - 1
        read = output_positions if collect is None else None  # the last layer runs at the positions read
        for i, (layer, key) in enumerate(zip(self.layers, keys[1:])):
            x = layer(x, keep_b1qt, deterministic, key, attention, position_ids, read if i == last else None)
            hidden.append(x)
        x = self.final_norm(x)
        if collect is not None:
            collect["hidden"], collect["attention"] = hidden, attention
        if output_positions is not None and read is None:
            x = jnp.take_along_axis(x, output_positions[..., None], axis=1)
        return x

    def mlm_logits(self, hidden_btd):
        h = self.head(hidden_btd)
        logits = jnp.dot(h, self.word.embedding[...].astype(h.dtype).T, preferred_element_type=jnp.float32)
        return logits if self.decoder_bias is None else logits + self.decoder_bias[...]

    def read_positions(self, batch_size: int):
        return None if self.config.classifier_pooling == "mean" else super().read_positions(batch_size)

    def classify_logits(self, hidden_btd, *, deterministic: bool = True, dropout_key=None, attention_mask=None):
        """[CLS] pooling, or the mean over the real tokens (`attention_mask`, (b, t); all when None)."""
        _check_dropout_key(deterministic, dropout_key)
        cfg = self.config
        if cfg.classifier_pooling == "mean":
            if hidden_btd.shape[1] == 1 or attention_mask is None:
                real = jnp.ones(hidden_btd.shape[:2], jnp.float32)
            else:
                real = (attention_mask if attention_mask.ndim == 2 else jnp.diagonal(attention_mask, axis1=1,
                                                                                    axis2=2)) > 0
            real = real.astype(jnp.float32)[..., None]
            pooled = (hidden_btd.astype(jnp.float32) * real).sum(1) / real.sum(1)
            x = self.head(pooled.astype(hidden_btd.dtype))
        else:
            x = self.head(hidden_btd[:, 0])
        x = dropout(x, cfg.classifier_dropout or 0.0, dropout_key, deterministic, cfg.dropout_rng)
        return self.classifier(x).astype(jnp.float32)

    def token_logits(self, hidden_btd, *, deterministic: bool = True, dropout_key=None):
        """Tag logits (b, t, c): the prediction head, dropout, the classifier at every position."""
        _check_dropout_key(deterministic, dropout_key)
        cfg = self.config
        x = dropout(self.head(hidden_btd), cfg.classifier_dropout or 0.0, dropout_key, deterministic, cfg.dropout_rng)
        return self.classifier(x).astype(jnp.float32)

    def span_logits(self, hidden_btd, *, deterministic: bool = True, dropout_key=None):
        """(start, end) answer-span logits, (b, t) float32 each: the prediction head, dropout, the classifier."""
        logits = self.token_logits(hidden_btd, deterministic=deterministic, dropout_key=dropout_key)
        return logits[..., 0], logits[..., 1]
