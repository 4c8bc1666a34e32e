"""Layers every family shares: activations by Hugging Face name, inverted dropout on counter-hash bits, the
custom-gradient dense product, and the `Encoder` protocol that tasks, methods, prediction and export call.

Shapes use suffixes: b batch, t tokens, d hidden, h heads, k head size, v vocabulary.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxopt_llm.errors import UserError


def _erf_gelu(x: jax.Array) -> jax.Array:
    """HF "gelu", PyTorch's formula x * (1 + erf(x / sqrt 2)) / 2: jax.nn.gelu(approximate=False) goes through
    erfc and its forward + backward took 2 - 3x as long on XLA:CPU, with the same distance to PyTorch's."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


_ACTIVATIONS = {
    "gelu": _erf_gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

DROPOUT_RNGS = ("hash", "threefry")  # BertConfig.dropout_rng
_RNG_CHOICES = " or ".join(map(repr, DROPOUT_RNGS))


def dropout(x: jax.Array, rate: float, key: jax.Array | None, deterministic: bool, rng: str = "hash") -> jax.Array:
    """Inverted dropout with an explicit key; identity when `deterministic` or `rate == 0`.

    The mask takes 16 random bits per element, two from each 32-bit word (a Bernoulli draw spends a whole word
    on each): an element is dropped when its bits fall below round(rate * 2^16), and the kept ones are scaled by
    the inverse of the exact keep probability, so the layer stays unbiased. The words come from `rng`:
    "hash" (`hash_bits`) or "threefry" (`jax.random.bits`, the earlier default).
    """
    if _no_dropout(rate, deterministic, rng):
        return x
    shape = (*x.shape[:-1], (x.shape[-1] + 1) // 2)
    return _drop(x, hash_bits(key, shape) if rng == "hash" else jax.random.bits(key, shape, jnp.uint32), rate)


def _no_dropout(rate: float, deterministic: bool, rng: str) -> bool:
    if rng not in DROPOUT_RNGS:
        raise UserError(f"dropout rng={rng!r}: use {_RNG_CHOICES}.")
    return deterministic or rate == 0.0


def _drop(x: jax.Array, words: jax.Array, rate: float) -> jax.Array:
    """x with the elements whose 16 bits (two per word of `words`, (..., ceil(d / 2))) fall below
    round(rate * 2^16) dropped, the rest scaled by the exact keep probability's inverse."""
    threshold = round(rate * 65536)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]
    return jnp.where(halves >= threshold, x / (1.0 - threshold / 65536), 0).astype(x.dtype)


def _mix32(x: jax.Array) -> jax.Array:
    """Wellons' lowbias32: a bijection of uint32 with near-ideal avalanche, in seven elementwise operations."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 words of `shape` for dropout masks: word i = mix(mix(i * 0x9E3779B9 + k0) ^ k1), with (k0, k1)
    the key's two words. Counter-based like threefry, but 14 integer operations a word instead of threefry's
    20 rounds, and elementwise, so XLA fuses it into the mask (the words are never written to memory) and it
    vmaps, scans and shards as any elementwise expression: vmapped over keys it gives each key's words.
    For one key the words of distinct indices differ (a bijection of the index). Not for cryptography."""
    n = math.prod(shape)
    if n >= 2**32:
        raise UserError(f"hash_bits: {n} words exceed the 32-bit counter; draw masks for at most 2**32 - 1 "
                         "words at a time.")
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    index = sum(jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)  # the row-major flat index,
                for d, stride in enumerate(strides))  # as elementwise terms: each device makes its own shard's
    return _hash_words(key, index)


def _hash_words(key: jax.Array, index: jax.Array) -> jax.Array:
    """The words of `hash_bits` at flat indices `index` (uint32)."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    pairs = data.reshape(-1, 2).astype(jnp.uint32)  # threefry: one pair; wider keys' pairs are folded by xor
    k0, k1 = jax.lax.reduce(pairs, jnp.uint32(0), jax.lax.bitwise_xor, (0,))
    return _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + k0) ^ k1)


def dropout_rows(x_nd: jax.Array, rows_n: jax.Array, shape: tuple[int, ...], rate: float, key: jax.Array | None,
                 deterministic: bool, rng: str = "hash") -> jax.Array:
    """`dropout` of an array of `shape` (..., d), computed at some of its rows only: `x_nd` holds the rows
    `rows_n` (indices into the array seen as (prod(shape[:-1]), d)) and gets the mask `dropout` draws for the
    whole array there, so a row's result does not depend on which other rows are computed (unpadded
    execution). Rows past the array (filler) get some mask."""
    if _no_dropout(rate, deterministic, rng):
        return x_nd
    width = (shape[-1] + 1) // 2
    if rng == "hash":
        index = rows_n.astype(jnp.uint32)[:, None] * jnp.uint32(width) + jnp.arange(width, dtype=jnp.uint32)
        words = _hash_words(key, index)
    else:
        words = jax.random.bits(key, (*shape[:-1], width), jnp.uint32).reshape(-1, width)
        words = words.at[rows_n].get(mode="clip")
    return _drop(x_nd, words, rate)


HEADS_ONE_BY_ONE_FROM = 128  # keys: on CPU, `attention` loops over heads from this row length on


def attention(q_bqhk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array, bias: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale + bias) v over the keys, (b, q, h, k); `bias` (b, 1, 1 or q, s). No dropout.

    On CPU from `HEADS_ONE_BY_ONE_FROM` keys on, one head at a time (`lax.map` over heads, each a batch of
    plain matrix products, which XLA:CPU runs on its fast GEMM path; the (b, h)-batched products of
    `jax.nn.dot_product_attention` it does not). MiniLM's classifier forward at batch 32, 2 EPYC cores: 1.07x
    at 128 tokens, 1.03x at 256, 1.29x at 384, 1.35x at 512; at 64 tokens it lost (0.93x at batch 64), so
    shorter rows keep the fused call. Elsewhere `jax.nn.dot_product_attention` (cuDNN on GPU). Heads are never
    sharded, so the loop does not gather a sharded batch."""
    if (jax.default_backend() != "cpu" or not jax.core.is_constant_dim(k_bshk.shape[1])
            or k_bshk.shape[1] < HEADS_ONE_BY_ONE_FROM):
        return jax.nn.dot_product_attention(q_bqhk, k_bshk, v_bshk, bias=bias.astype(q_bqhk.dtype), scale=scale)
    bias_bqs = bias[:, 0].astype(jnp.float32)

    def head(qkv):  # one head: (b, q, k), (b, s, k), (b, s, k)
        q, k, v = qkv
        scores = jnp.matmul(q, k.transpose(0, 2, 1), preferred_element_type=jnp.float32) * scale + bias_bqs
        return jnp.matmul(jax.nn.softmax(scores, -1).astype(v.dtype), v)

    heads = jax.lax.map(head, tuple(x.transpose(2, 0, 1, 3) for x in (q_bqhk, k_bshk, v_bshk)))  # (h, b, q, k)
    return heads.transpose(1, 2, 0, 3)


def _keys(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    return [None] * n if key is None else list(jax.random.split(key, n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense(x: jax.Array, w: jax.Array, bias: jax.Array, out_dtype) -> jax.Array:
    """x (..., k) @ w (k, n) + bias (n), in `out_dtype` (x, w in the compute dtype). Same values and gradients as
    the plain expression; in the backward pass the weight gradient contracts the tokens with the smaller of x
    and the output gradient transposed, and the bias gradient is a matrix-vector product. XLA:CPU, left to
    JAX's rules, transposed the larger operand (an FFN activation gradient; the MLM decoder's 640 x 30522
    logit gradient) and ran the product outside YNNPACK, and summed bias gradients column-wise: classification
    step 1.25x, MLM step 1.2x slower on the bench. Reverse mode only: `jax.jvp` is not defined through it."""
    return jnp.dot(x, w, preferred_element_type=out_dtype) + bias.astype(out_dtype)


def _dense_fwd(x, w, bias, out_dtype):
    return dense(x, w, bias, out_dtype), (x, w, bias)


def _dense_bwd(out_dtype, residuals, g):
    x, w, bias = residuals
    k, n = w.shape
    g_c = g.astype(w.dtype)
    x_nk, g_nn = x.reshape(-1, k), g_c.reshape(-1, n)
    f32 = jnp.float32
    dw = (jnp.dot(x_nk.T, g_nn, preferred_element_type=f32) if k <= n
          else jnp.dot(g_nn.T, x_nk, preferred_element_type=f32).T)
    dx = jnp.dot(g_c, w.T, preferred_element_type=f32)
    db = jnp.dot(jnp.ones((g_nn.shape[0],), g.dtype), g.reshape(-1, n), preferred_element_type=f32)
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(bias.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _dense(x, kernel, bias, dtype):
    return dense(x.astype(dtype), kernel.astype(dtype), bias, jnp.dtype(dtype))


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters, kernel (in, out), with or without a bias) computed by `dense`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        bias = jnp.zeros(kernel.shape[-1], kernel.dtype) if self.bias is None else self.bias[...]
        return _dense(x, kernel, bias, self.dtype or jnp.result_type(x, kernel))


def _check_dropout_key(deterministic: bool, key: jax.Array | None) -> None:
    if not deterministic and key is None:
        raise UserError("deterministic=False needs dropout_key=jax.random.key(...): dropout keys are explicit.")


class Encoder(nnx.Module):
    """What every family's module shares of the encoder protocol: `heads` by task and `__call__` from the
    stages, and the token and span heads of families whose heads are one linear layer (`classifier`, `qa`). A
    family implements `embed`, `encode`, `classify_logits` and `mlm_logits` (and `nsp_logits` for pretraining),
    overrides `token_logits` / `span_logits` / `token_dropout` where its heads differ, and sets `task`."""

    nsp = None  # the next-sentence head; a family with one (BERT) sets it per instance

    def read_positions(self, batch_size: int) -> jax.Array | None:
        """The positions (b, p) that `classify_logits` reads: [CLS], (b, 1) zeros; None: every position (mean
        pooling). Callers run the last layer there only."""
        return jnp.zeros((batch_size, 1), jnp.int32)

    def heads(self, hidden_btd: jax.Array, *, deterministic: bool = True,
              dropout_key: jax.Array | None = None, attention_mask: jax.Array | None = None) -> Any:
        if self.task == "base":
            return hidden_btd
        if self.task == "masked-lm":
            return self.mlm_logits(hidden_btd)
        if self.task == "pretraining":
            return self.mlm_logits(hidden_btd), self.nsp_logits(hidden_btd)
        if self.task == "token-classification":
            return self.token_logits(hidden_btd, deterministic=deterministic, dropout_key=dropout_key)
        if self.task == "question-answering":
            return self.span_logits(hidden_btd, deterministic=deterministic, dropout_key=dropout_key)
        return self.classify_logits(hidden_btd, deterministic=deterministic, dropout_key=dropout_key,
                                    attention_mask=attention_mask)

    def token_dropout(self) -> float:
        """The dropout rate before the token classifier (a family's own choice of its config's rates)."""
        return self.config.hidden_dropout_prob

    def token_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                     dropout_key: jax.Array | None = None) -> jax.Array:
        """Tag logits (b, t, c) float32: dropout (`token_dropout`), then `classifier` at every position."""
        _check_dropout_key(deterministic, dropout_key)
        x = dropout(hidden_btd, self.token_dropout(), dropout_key, deterministic, self.config.dropout_rng)
        return self.classifier(x).astype(jnp.float32)

    def span_logits(self, hidden_btd: jax.Array, *, deterministic: bool = True,
                    dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(start, end) answer-span logits, (b, t) float32 each, from `qa` (hidden -> 2)."""
        _check_dropout_key(deterministic, dropout_key)
        logits = self.qa(hidden_btd).astype(jnp.float32)
        return logits[..., 0], logits[..., 1]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
                 dropout_key: jax.Array | None = None) -> Any:
        """The task's output for token ids (b, t), with the keywords of Hugging Face models:
        `model(input_ids, attention_mask=mask, token_type_ids=types)`; see the class docstring."""
        k_encode, k_head = _keys(dropout_key, 2)
        hidden = self.encode(self.embed(input_ids), attention_mask, token_type_ids,
                             deterministic=deterministic, dropout_key=k_encode)
        return self.heads(hidden, deterministic=deterministic, dropout_key=k_head, attention_mask=attention_mask)
