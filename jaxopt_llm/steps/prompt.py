"""Cloze-prompt classification (PET, Schick & Schütze 2021): a pattern with one [MASK] slot turns a text
into a cloze question, and a verbalizer names the word(s) whose probability at the slot stands for each
label:  "{text} It was [MASK]."  with  positive -> great, negative -> bad.

A label's score is the log-probability of its word at the slot. A word of k tokens is scored exactly:
the slot becomes k [MASK] tokens and the score is the sum of the k tokens' log-probabilities (PET). All
words of all labels are scored in one pass: for each distinct word length k the example is encoded once
with k masks, and those variants are packed side by side in one row (block-diagonal attention, positions
restarting per block), so a batch of texts is one (b, L * t) array whatever the verbalizer. Several words
of a label combine by `logsumexp` (the probability that any of them fills the slot) or `mean`.

The prompt task trains with cross-entropy over the label scores (prompt fine-tuning, PET's L_CE), plus
PET's optional auxiliary MLM loss on the texts (`mlm_weight`). It is a Task like the others, so
adversarial training and distillation take it unchanged. The run folder keeps prompt.json.

batch (besides the classification keys): prompt_ids, prompt_mask, prompt_types (b, L * t) int32;
prompt_slots (b, L, K) int32, the positions of the k masks of variant l (padded with 0).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import packing
from jaxopt_llm.errors import UserError
from jaxopt_llm.parallel import global_mean
from jaxopt_llm.steps.classify import ClassificationTask
from jaxopt_llm.steps.mlm import MaskedLMTask, Masking
from jaxopt_llm.steps.task import DataNeeds, Prepared, Targets

_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_MASK = "[MASK]"
COMBINE = ("logsumexp", "mean")


class PromptError(UserError):
    """A pattern or verbalizer cannot work; the message names the value and the fix."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """pattern: text with {text} (and optionally {text_pair}) and exactly one [MASK];
    verbalizer: ((label, (word, ...)), ...) in label order; combine: how a label's words combine."""

    pattern: str
    verbalizer: tuple[tuple[str, tuple[str, ...]], ...]
    combine: str = "logsumexp"

    def __post_init__(self):
        count = self.pattern.count(_MASK)
        if count != 1:
            raise PromptError(f"pattern {self.pattern!r} has {count} {_MASK} slots; it needs exactly one, e.g. "
                              "'{text} It was [MASK].'")
        names = _PLACEHOLDER.findall(self.pattern)
        unknown = sorted(set(names) - {"text", "text_pair"})
        if unknown:
            raise PromptError(f"pattern {self.pattern!r} has unknown placeholder(s) {['{' + u + '}' for u in unknown]}; "
                              "use {text} and optionally {text_pair}.")
        if "text" not in names:
            raise PromptError(f"pattern {self.pattern!r} has no {{text}} placeholder.")
        if not self.verbalizer:
            raise PromptError("the verbalizer is empty: give label=word pairs, e.g. 'negative=bad;positive=great'.")
        empty = [label for label, words in self.verbalizer if not [w for w in words if w.strip()]]
        if empty:
            raise PromptError(f"label(s) {empty} have no words in the verbalizer; give each label at least one word.")
        if self.combine not in COMBINE:
            raise PromptError(f"prompt.combine={self.combine!r}: use one of {COMBINE}.")

    @classmethod
    def parse(cls, pattern: str, verbalizer: str | dict, combine: str = "logsumexp") -> Prompt:
        """verbalizer: {"label": "word" or ["word", ...]} or the text form "label=word|word;label=word"."""
        if isinstance(verbalizer, str):
            items = []
            for part in filter(str.strip, verbalizer.split(";")):
                label, sep, words = part.partition("=")
                if not sep:
                    raise PromptError(f"verbalizer entry {part!r} is not label=word (e.g. 'positive=great|good').")
                items.append((label.strip(), tuple(w.strip() for w in words.split("|") if w.strip())))
        else:
            items = [(str(k), (v,) if isinstance(v, str) else tuple(v)) for k, v in verbalizer.items()]
        return cls(pattern, tuple(items), combine)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.verbalizer)

    def to_json(self) -> dict:
        return {"pattern": self.pattern, "verbalizer": {label: list(words) for label, words in self.verbalizer},
                "combine": self.combine}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A prompt bound to a tokenizer and a length: the token ids of the pattern's pieces and the word table."""

    prompt: Prompt
    pieces: tuple[Any, ...]  # token-id tuples (literal text), "text", "text_pair", or "mask"
    lengths: tuple[int, ...]  # distinct word lengths in tokens, ascending: the L packed variants
    word_tokens: tuple[tuple[int, ...], ...]
    word_label: tuple[int, ...]
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    max_length: int

    @property
    def special(self) -> dict[str, int]:
        return {"cls": self.cls_id, "sep": self.sep_id, "pad": self.pad_id, "mask": self.mask_id}

    @property
    def width(self) -> int:
        """K: the most tokens of a word."""
        return max(self.lengths)

    def describe(self) -> str:
        return "; ".join(f"{label}: " + ", ".join(f"{w}={len(t)} token{'s' * (len(t) > 1)}" for w, t in pairs)
                         for label, pairs in self.words_by_label())

    def words_by_label(self):
        words = [w for _, ws in self.prompt.verbalizer for w in ws]
        by = {}
        for w, t, label in zip(words, self.word_tokens, self.word_label):
            by.setdefault(self.prompt.labels[label], []).append((w, t))
        return list(by.items())

    def to_json(self) -> dict:
        """The prompt as written, and as tokenized: enough to pack and score texts without the tokenizer's
        model code (an exported artifact does)."""
        return {**self.prompt.to_json(), "max_length": self.max_length,
                "word_tokens": {label: {w: list(t) for w, t in pairs} for label, pairs in self.words_by_label()},
                "pieces": [p if isinstance(p, str) else list(p) for p in self.pieces], "lengths": list(self.lengths),
                "special": self.special, "word_ids": [list(t) for t in self.word_tokens],
                "word_label": list(self.word_label)}


def encode_prompt(prompt: Prompt, tokenizer: Any, max_length: int) -> Encoded:
    """Check the prompt against the tokenizer (every word known, the pattern fits) and tokenize its pieces."""
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    pieces = []
    for part in re.split(r"(\{text\}|\{text_pair\}|\[MASK\])", prompt.pattern):
        if part in ("{text}", "{text_pair}"):
            pieces.append(part[1:-1])
        elif part == _MASK:
            pieces.append("mask")
        elif part.strip():
            pieces.append(ids(part))
    words, labels, unknown = [], [], []
    for i, (label, ws) in enumerate(prompt.verbalizer):
        for w in ws:
            t = ids(w)
            if not t or tokenizer.unk_token_id in t:
                unknown.append(w)
            words.append(t)
            labels.append(i)
    if unknown:
        raise PromptError(f"verbalizer word(s) {unknown} are not in the tokenizer's vocabulary (they become "
                          f"{tokenizer.unk_token}); pick words it knows.")
    lengths = tuple(sorted({len(t) for t in words}))
    fixed = sum(len(p) for p in pieces if isinstance(p, tuple)) + 2 + max(lengths)
    if fixed >= max_length:
        raise PromptError(f"pattern {prompt.pattern!r} and its longest word take {fixed} of data.max_length="
                          f"{max_length} tokens, leaving no room for the text; raise data.max_length.")
    return Encoded(prompt, tuple(pieces), lengths, tuple(words), tuple(labels), tokenizer.cls_token_id,
                   tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id, max_length)


def encode_texts(enc: Encoded, tokenizer: Any, texts, pairs=None, prefix: str = "prompt") -> dict[str, np.ndarray]:
    """The packed prompt arrays of `texts`: {prefix}_ids, _mask, _types (n, L * t), _slots (n, L, K)."""
    text_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    pair_ids = tokenizer(list(pairs), add_special_tokens=False)["input_ids"] if pairs is not None else None
    return packing.pack(enc.pieces, enc.lengths, enc.special, enc.max_length, text_ids, pair_ids, prefix)


def label_scores(model, embeddings, batch: dict, enc: Encoded, *, deterministic: bool = True,
                 dropout_key=None, collect=None, prefix: str = "prompt") -> jax.Array:
    """(b, C) float32 label scores from the embeddings of the packed prompt ids (b, L * t)."""
    b, T = embeddings.shape[:2]
    t, L, K = enc.max_length, len(enc.lengths), enc.width
    block = np.arange(T) // t
    visible = jnp.asarray(block[:, None] == block[None, :]) & (batch[f"{prefix}_mask"][:, None, :] > 0)  # (b,T,T)
    positions = jnp.broadcast_to(jnp.asarray(np.arange(T) % t), (b, T))
    slots = batch[f"{prefix}_slots"].reshape(b, L * K)
    hidden = model.encode(embeddings, visible, batch[f"{prefix}_types"], positions, deterministic=deterministic,
                          dropout_key=dropout_key, output_positions=None if collect is not None else slots,
                          collect=collect)
    if collect is not None:
        hidden = jnp.take_along_axis(hidden, slots[..., None], axis=1)
    logp = jax.nn.log_softmax(model.mlm_logits(hidden), axis=-1).reshape(b, L, K, -1)  # vocabulary at slots only
    width = np.zeros((len(enc.word_tokens), K), np.int32)
    used = np.zeros((len(enc.word_tokens), K), bool)
    variant = np.zeros(len(enc.word_tokens), np.int32)
    for w, tokens in enumerate(enc.word_tokens):
        width[w, :len(tokens)], used[w, :len(tokens)] = tokens, True
        variant[w] = enc.lengths.index(len(tokens))
    picked = logp[:, variant[:, None], np.arange(K)[None, :], width]  # (b, W, K): token j of word w at mask j
    words = jnp.sum(jnp.where(used, picked, 0.0), axis=-1)  # (b, W): log p(word) with k masks
    member = np.asarray([[label == c for label in enc.word_label] for c in range(len(enc.prompt.labels))])
    if enc.prompt.combine == "logsumexp":
        return jax.nn.logsumexp(jnp.where(member, words[:, None, :], -jnp.inf), axis=-1)
    return jnp.sum(jnp.where(member, words[:, None, :], 0.0), -1) / member.sum(-1)


@dataclasses.dataclass(frozen=True)
class PromptTask:
    """Classification by cloze prompt on the MLM head. `mlm`: PET's auxiliary MLM loss on the texts, weighted
    by `mlm_weight` (0: none)."""

    encoded: Encoded
    tokenizer_ref: Any = dataclasses.field(default=None, compare=False, hash=False, repr=False)
    mlm: MaskedLMTask | None = None
    mlm_weight: float = 0.0
    prefix: str = "prompt"  # batch keys {prefix}_ids, ...: several prompts (teachers) can share a batch
    name: str = "prompt"
    head: str = "masked-lm"

    @property
    def data(self) -> DataNeeds:
        return DataNeeds(labels=True, label_names=self.encoded.prompt.labels, encode=self.encode)

    def encode(self, texts, pairs=None, max_length=None) -> dict[str, np.ndarray]:
        """The batch arrays of texts (the prompt's own max_length holds)."""
        return encode_texts(self.encoded, self.tokenizer_ref, texts, pairs, self.prefix)

    def prepare(self, batch, key):
        ids, mask = batch[f"{self.prefix}_ids"], batch[f"{self.prefix}_mask"]
        if self.mlm is None or self.mlm_weight == 0 or key is None:
            return Prepared(ids, None, key, mask)
        key, mlm_key = jax.random.split(key)
        return Prepared(ids, self.mlm.prepare(batch, mlm_key), key, mask)

    def forward(self, model, embeddings, batch, extra, *, deterministic=True, dropout_key=None, collect=None):
        """Label scores (b, C); with the auxiliary MLM loss in training, (scores, MLM outputs)."""
        scores = label_scores(model, embeddings, batch, self.encoded, deterministic=deterministic,
                              dropout_key=dropout_key, collect=collect, prefix=self.prefix)
        if extra is None:
            return scores
        mlm_out = self.mlm.forward(model, model.embed(extra.input_ids), batch, extra.extra,
                                   deterministic=deterministic, dropout_key=extra.dropout_key)
        return scores, mlm_out

    def targets(self, outputs, batch, extra):
        scores = outputs[0] if isinstance(outputs, tuple) else outputs
        return Targets(scores, batch["labels"], batch["weight"] > 0)

    def loss(self, outputs, batch, extra):
        scores = outputs[0] if isinstance(outputs, tuple) else outputs
        loss, metrics = ClassificationTask().loss(scores, batch, None)
        if isinstance(outputs, tuple):
            mlm_loss, mlm_metrics = self.mlm.loss(outputs[1], batch, extra.extra)
            metrics["mlm_loss"], metrics["ce"] = mlm_metrics["loss"], metrics["loss"]
            loss = loss + self.mlm_weight * mlm_loss
            n = jnp.sum(batch["weight"] > 0, dtype=jnp.float32)
            metrics["loss"] = (loss, global_mean(n, n))  # this device's share of the global loss
        return loss, metrics

    def eval_metrics(self, outputs, batch, extra):
        return ClassificationTask().eval_metrics(outputs, batch, None)

    def summarize(self, sums):
        return ClassificationTask().summarize(sums)

    def baseline(self, train, eval):
        return ClassificationTask().baseline(train, eval)

    def files(self):
        return {"prompt.json": self.encoded.to_json()}


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """Config keys prompt.*: the pattern, the verbalizer ("label=word|word;label=word"), how a label's words
    combine, and the weight of PET's auxiliary MLM loss."""

    pattern: str = "{text} It was [MASK]."  # cloze pattern: {text} (and optionally {text_pair}) and one [MASK]
    verbalizer: str = "negative=bad;neutral=okay;positive=great"  # label=word|word;label=word
    combine: str = "logsumexp"  # how a label's words combine: logsumexp | mean
    mlm_weight: float = 0.0  # weight of PET's auxiliary MLM loss on the training texts

    def __post_init__(self):
        Prompt.parse(self.pattern, self.verbalizer, self.combine)  # every pattern error, before anything runs
        if not (math.isfinite(self.mlm_weight) and self.mlm_weight >= 0):
            raise PromptError(f"prompt.mlm_weight={self.mlm_weight}: must be a finite number >= 0.")


def task_from_config(config, tokenizer) -> PromptTask:
    o = config.task_options
    encoded = encode_prompt(Prompt.parse(o.pattern, o.verbalizer, o.combine), tokenizer, config.data.max_length)
    mlm = None
    if o.mlm_weight > 0:
        d = config.data
        mlm = MaskedLMTask(Masking(mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                   rate=d.mlm_probability, max_predictions=d.max_predictions_per_seq))
    return PromptTask(encoded, tokenizer, mlm, o.mlm_weight)


def from_json(record: dict, tokenizer: Any, prefix: str = "prompt") -> PromptTask:
    """The prompt task of a run folder's prompt.json (for prediction, or as a distillation teacher)."""
    prompt = Prompt.parse(record["pattern"], record["verbalizer"], record.get("combine", "logsumexp"))
    return PromptTask(encode_prompt(prompt, tokenizer, int(record["max_length"])), tokenizer, prefix=prefix)


OPTIONS = PromptOptions
