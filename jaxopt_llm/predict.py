"""The jitted prediction engines behind `jaxopt_llm.inference`: one model, stacked members, cloze prompts.

Inputs are cut to the model's `max_length` (`packing`'s one truncation rule), padded to a length bucket and
a power-of-two batch, so new texts reuse the compiled programs: at most one compile per (bucket, batch
size) pair, never one per call. Engines return uncalibrated scores; `inference.Inference` applies the
temperature. Build them with `inference.load(reference)`, which decides what a model reference holds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm import packing
from jaxopt_llm.errors import UserError
from jaxopt_llm.packing import LENGTH_BUCKETS

MASK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _fill_mask(graphdef, state, ids_bt, mask_bt, types_bt, positions_bp, top_k):
    model = nnx.merge(graphdef, state)
    hidden_bpd = model.encode(model.embed(ids_bt), mask_bt, types_bt, output_positions=positions_bp)
    probs_bpv = jax.nn.softmax(model.mlm_logits(hidden_bpd), axis=-1)  # vocabulary only at [MASK] positions
    return jax.lax.top_k(probs_bpv, top_k)


def class_logits(graphdef, state, ids_bt, mask_bt, types_bt):
    """(b, c) class logits; the last layer runs at the positions the head reads only ([CLS])."""
    model = nnx.merge(graphdef, state)
    hidden = model.encode(model.embed(ids_bt), mask_bt, types_bt, output_positions=model.read_positions(len(ids_bt)))
    return model.classify_logits(hidden, attention_mask=mask_bt)


_logits = jax.jit(class_logits, static_argnames=("graphdef",))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _span_logits(graphdef, state, ids_bt, mask_bt, types_bt):
    """(start, end) logits (b, t) each, padding at the float32 minimum."""
    model = nnx.merge(graphdef, state)
    start, end = model.span_logits(model.encode(model.embed(ids_bt), mask_bt, types_bt))
    low = jnp.finfo(jnp.float32).min
    return jnp.where(mask_bt > 0, start, low), jnp.where(mask_bt > 0, end, low)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ensemble_span_logits(graphdef, stacked, ids_bt, mask_bt, types_bt):
    """(start, end) (b, t): the stacked members' span logits, averaged."""
    start, end = jax.vmap(lambda s: _span_logits(graphdef, s, ids_bt, mask_bt, types_bt))(stacked)
    return start.mean(0), end.mean(0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _ensemble_token_probs(graphdef, stacked, ids_bt, mask_bt, types_bt):
    """(b, t, c) mean over the stacked members of their tag probabilities."""
    return jax.vmap(lambda s: _token_probs(graphdef, s, ids_bt, mask_bt, types_bt))(stacked).mean(0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_probs(graphdef, state, ids_bt, mask_bt, types_bt):
    """(b, t, c) tag probabilities at every position."""
    model = nnx.merge(graphdef, state)
    return jax.nn.softmax(model.token_logits(model.encode(model.embed(ids_bt), mask_bt, types_bt)), -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "how"))
def _ensemble_logits(graphdef, stacked, ids_bt, mask_bt, types_bt, how):
    """(log of the combined probabilities (b, c), members' logits (N, b, c)) in one program."""
    from jaxopt_llm.steps.ensemble import combine

    logits = jax.vmap(lambda p: class_logits(graphdef, p, ids_bt, mask_bt, types_bt))(stacked)
    return jnp.log(jnp.maximum(combine(logits, how), 1e-30)), logits


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def _embed(graphdef, state, ids_bt, mask_bt, types_bt, normalize):
    model = nnx.merge(graphdef, state)
    hidden_btd = model.encode(model.embed(ids_bt), mask_bt, types_bt).astype(jnp.float32)
    weights_bt1 = mask_bt[..., None].astype(jnp.float32)
    mean_bd = (hidden_btd * weights_bt1).sum(1) / jnp.maximum(weights_bt1.sum(1), 1e-9)
    if normalize:
        mean_bd = mean_bd / jnp.maximum(jnp.linalg.norm(mean_bd, axis=-1, keepdims=True), 1e-12)
    return mean_bd


def _prompt_scores(graphdef, state, batch, task):
    model = nnx.merge(graphdef, state)
    prepared = task.prepare(batch, None)
    return task.forward(model, model.embed(prepared.input_ids), batch, None)


_prompt_logits = jax.jit(_prompt_scores, static_argnames=("graphdef", "task"))


@functools.partial(jax.jit, static_argnames=("graphdef", "task", "shared"))
def _prompt_ensemble(graphdef, params, batches, task, shared):
    """(P, b, C) probabilities of P (model, pattern) members in one program: vmap over the member axis of
    the encoded batches, and of the parameters unless they are `shared` by every member."""
    def member(p, batch):
        return jax.nn.softmax(_prompt_scores(graphdef, p, batch, task), -1)

    return jax.vmap(member, in_axes=(None if shared else 0, 0))(params, batches)


def compile_count() -> int:
    """Programs compiled so far by this module's jitted functions (for tests and logs)."""
    return sum(f._cache_size() for f in (_fill_mask, _logits, _embed, _prompt_logits, _prompt_ensemble,
                                         _ensemble_logits))


def prompt_task(prompt, tokenizer, max_length: int = 128):
    """A PromptTask for prediction from a `Prompt` (zero-shot with any MLM model)."""
    from jaxopt_llm.steps.prompt import PromptTask, encode_prompt

    return PromptTask(encode_prompt(prompt, tokenizer, max_length), tokenizer)


def prompt_arrays(task, backend, texts: Sequence[str], batch: int | None = None) -> dict[str, np.ndarray]:
    """The packed prompt rows of texts (`packing.pack`), padded to `batch` rows."""
    e = task.encoded
    ids = [x.ids for x in packing.encode(backend, texts, special_tokens=False)]
    arrays = packing.pack(e.pieces, e.lengths, e.special, e.max_length, ids, prefix=task.prefix)
    return packing.pad_rows(arrays, batch) if batch else arrays


class Predictor:
    """A `Bert` and its tokenizer, predicting in fixed-shape batches; texts cut to `max_length` tokens
    (default: the model's positions)."""

    def __init__(self, model, tokenizer: Any, *, max_length: int | None = None, batch_size: int = 32,
                 length_buckets: Sequence[int] = LENGTH_BUCKETS, prompt: Any = None):
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}: must be at least 1.")
        positions = model.config.max_tokens
        max_length = positions if max_length is None else int(max_length)
        if not 1 <= max_length <= positions:
            raise UserError(f"max_length={max_length}: must be between 1 and the model's {positions} positions.")
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.prompt = prompt  # a PromptTask: scores by cloze prompt on the MLM head
        self.length_buckets = packing.buckets_for(max_length, length_buckets)
        self.backend = packing.truncating(tokenizer.backend_tokenizer, max_length)
        self.graphdef, self.state = nnx.split(model)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(rows of `texts`, padded arrays) in order of token length: each batch is padded to the smallest
        bucket that holds its longest text and to a power-of-two size, so similar lengths share a batch and
        new texts reuse compiled programs."""
        return self.batches_of(packing.encode(self.backend, texts))

    def batches_of(self, encodings: Sequence) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """`batches` of encodings already made with `packing.encode(self.backend, ...)`."""
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(encodings), self.batch_size):
            rows = order[start:start + self.batch_size]
            t = packing.bucket(max(len(encodings[r].ids) for r in rows), self.length_buckets)
            b = packing.power_of_two(len(rows), self.batch_size)
            yield rows, packing.rows([encodings[r] for r in rows], t, self.pad_id, b)

    def map(self, texts: Sequence[str], fn) -> np.ndarray:
        """fn(arrays) -> (b, ...) outputs of every batch, gathered back into the order of `texts`."""
        texts = packing.check_texts(texts)
        out = None
        for rows, arrays in self.batches(texts):
            values = np.asarray(fn(arrays))[:len(rows)]
            if out is None:
                out = np.zeros((len(texts), *values.shape[1:]), values.dtype)
            out[rows] = values
        return out

    def logits_of(self, arrays: dict[str, np.ndarray]) -> jax.Array:
        """(b, c) uncalibrated scores of token arrays: class logits, or a prompt's label log-scores."""
        if self.prompt is not None:
            return _prompt_logits(self.graphdef, self.state, arrays, self.prompt)
        self._need("classifier", "sequence-classification")
        return _logits(self.graphdef, self.state, arrays["input_ids"], arrays["attention_mask"],
                       arrays["token_type_ids"])

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """(n, c) uncalibrated scores of texts (the raw value for a regression head)."""
        if self.prompt is not None:
            texts = packing.check_texts(texts)
            parts = []
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start:start + self.batch_size]
                arrays = prompt_arrays(self.prompt, self.backend, chunk, packing.power_of_two(len(chunk),
                                                                                              self.batch_size))
                parts.append(np.asarray(self.logits_of(arrays))[:len(chunk)])
            return np.concatenate(parts) if parts else np.zeros((0, len(self.prompt.encoded.prompt.labels)))
        return self.map(texts, self.logits_of)

    def fill_mask(self, texts: Sequence[str], top_k: int = 5) -> list[list[dict] | list[list[dict]]]:
        """Top-k tokens for each [MASK]: per text a list of {token, token_id, score}; a list of such
        lists when the text has several masks."""
        self._need("mlm", "masked-lm")
        texts = packing.check_texts(texts)
        mask_id = self.tokenizer.mask_token_id
        if top_k < 1 or top_k > self.model.config.vocab_size:
            raise UserError(f"top_k={top_k}: must be between 1 and vocab_size={self.model.config.vocab_size}.")
        results = [None] * len(texts)
        for rows, a in self.batches(texts):
            where = [np.flatnonzero(row == mask_id) for row in a["input_ids"][:len(rows)]]
            for r, w in zip(rows, where):
                if not len(w):
                    raise UserError(f"text {texts[r]!r} has no {self.tokenizer.mask_token} token "
                                     f"(or it was cut off at max_length={self.max_length}): fill-mask needs one.")
            p = packing.bucket(max(len(w) for w in where), MASK_BUCKETS)
            positions = np.zeros((a["input_ids"].shape[0], p), np.int32)
            for i, w in enumerate(where):
                positions[i, :len(w)] = w[:p]
            scores, ids = jax.device_get(_fill_mask(self.graphdef, self.state, a["input_ids"], a["attention_mask"],
                                                    a["token_type_ids"], positions, top_k))
            for i, (r, w) in enumerate(zip(rows, where)):
                per_mask = [[{"token": self.tokenizer.convert_ids_to_tokens(int(t)), "token_id": int(t),
                              "score": float(s)} for t, s in zip(ids[i, j], scores[i, j])]
                            for j in range(len(w))]
                results[r] = per_mask[0] if len(per_mask) == 1 else per_mask
        return results

    def embed(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        """Mean-pooled last hidden states (n, d), L2-normalised by default (sentence-transformers' recipe)."""
        return self.map(texts, lambda a: _embed(self.graphdef, self.state, a["input_ids"], a["attention_mask"],
                                                a["token_type_ids"], normalize))

    def tag(self, texts: Sequence[str], aggregation: str = "first") -> list[list[dict]]:
        """Per text, its entities with character offsets (`tagging.decode`); texts cut to `max_length`."""
        from jaxopt_llm import tagging

        if self.model.task != "token-classification":
            raise UserError(f"this model was loaded with task={self.model.task!r}; tagging needs a token "
                            "classifier (task=token-classification).")
        texts = packing.check_texts(texts)
        encodings = packing.encode(self.backend, texts)
        labels = self.model.config.label_names
        out: list = [None] * len(texts)
        for rows, arrays in self.batches_of(encodings):  # the encodings decode() reads offsets from
            probs = np.asarray(self.token_probs_of(arrays))
            for j, r in enumerate(rows):
                out[r] = tagging.decode(texts[r], encodings[r], probs[j], labels, aggregation)
        return out

    def answer(self, questions: Sequence[str], contexts: Sequence[str], *, stride: int = 32,
               max_answer_length: int = 30, no_answer: bool = False) -> list[dict]:
        """Per question its {answer, score, start, end} in its context (`answers`): the context cut into
        windows of `max_length` tokens overlapping by `stride`, the best span over them."""
        from jaxopt_llm import answers

        if self.model.task != "question-answering":
            raise UserError(f"this model was loaded with task={self.model.task!r}; answering needs a "
                            "question-answering model.")
        answers.check_stride(stride, self.max_length)
        questions, contexts = packing.check_texts(questions), packing.check_texts(contexts)
        if len(questions) != len(contexts):
            raise UserError(f"{len(questions)} questions but {len(contexts)} contexts: give one context each.")
        rows, example_of, offsets = packing.qa_windows(self.tokenizer, questions, contexts, self.max_length, stride)
        logits = []  # per window (2, t), copied to the host once per batch
        for start in range(0, len(example_of), self.batch_size):
            chunk = {k: v[start:start + self.batch_size] for k, v in rows.items()}
            n = len(chunk["input_ids"])
            s, e = self.span_logits_of(packing.pad_rows(chunk, packing.power_of_two(n, self.batch_size)))
            logits += list(np.stack([np.asarray(s), np.asarray(e)], 1)[:n])
        return answers.from_windows(contexts, example_of, logits, offsets, max_answer_length, no_answer)

    _span_fn = staticmethod(_span_logits)  # an ensemble's: the members' mean
    _token_fn = staticmethod(_token_probs)

    def span_logits_of(self, arrays: dict[str, np.ndarray]) -> tuple[jax.Array, jax.Array]:
        """(start, end) answer-span logits (b, t) of token arrays, padding at the float32 minimum."""
        return self._span_fn(self.graphdef, self.state, *(arrays[k] for k in packing.INPUTS))

    def token_probs_of(self, arrays: dict[str, np.ndarray]) -> jax.Array:
        """(b, t, c) tag probabilities of token arrays."""
        return self._token_fn(self.graphdef, self.state, *(arrays[k] for k in packing.INPUTS))

    def _need(self, module: str, task: str) -> None:
        if getattr(self.model, module) is None:
            raise UserError(f"this model was loaded with task={self.model.task!r}; load it with task={task!r}.")


class EnsemblePredictor(Predictor):
    """Members of one architecture and label set, stacked on a leading axis and predicted in one program,
    combined by mean probability (default), mean logit or vote."""

    def __init__(self, graphdef, stacked, tokenizer, *, combine: str = "mean-prob", max_length: int | None = None,
                 batch_size: int = 32, length_buckets: Sequence[int] = LENGTH_BUCKETS):
        from jaxopt_llm.steps.ensemble import COMBINE

        if combine not in COMBINE:
            raise UserError(f"combine={combine!r}: use one of {COMBINE}.")
        super().__init__(nnx.merge(graphdef, jax.tree.map(lambda x: x[0], stacked)), tokenizer,
                         max_length=max_length, batch_size=batch_size, length_buckets=length_buckets)
        self.graphdef, self.state, self.combine = graphdef, stacked, combine  # self.model: member 0, for its config
        self.members = len(jax.tree.leaves(stacked)[0])

    def _both(self, arrays):
        return _ensemble_logits(self.graphdef, self.state, arrays["input_ids"], arrays["attention_mask"],
                                arrays["token_type_ids"], self.combine)

    def logits_of(self, arrays: dict[str, np.ndarray]) -> jax.Array:
        """(b, c) log of the combined probabilities."""
        return self._both(arrays)[0]

    def member_probs(self, texts: Sequence[str]) -> np.ndarray:
        """(N, n, c) every member's probabilities."""
        out = self.map(texts, lambda a: np.swapaxes(np.asarray(jax.nn.softmax(self._both(a)[1], -1)), 0, 1))
        return np.swapaxes(out, 0, 1)

    _span_fn = staticmethod(_ensemble_span_logits)  # the members' mean span logits
    _token_fn = staticmethod(_ensemble_token_probs)  # their mean tag probabilities (mean-prob for taggers)

    def fill_mask(self, texts, top_k=5):
        raise UserError("an ensemble classifies; fill-mask needs one masked-LM model.")


class PromptEnsemble:
    """Several (model, pattern) members scored in one program: the vmapped member axis runs over the
    patterns' encodings and, for runs fine-tuned one per pattern, over their stacked parameters (one shared
    model for zero-shot). Members are combined by a weighted mean of their label probabilities: equal
    weights, or PET's weights from each member's accuracy on labelled examples (`fit_weights`)."""

    def __init__(self, graphdef, params, tasks: list, tokenizer, *, shared: bool, weights=None, batch_size: int = 32):
        first = tasks[0]
        for t in tasks[1:]:
            if (t.encoded.prompt.labels, t.encoded.lengths, t.encoded.max_length, t.encoded.word_tokens) != (
                    first.encoded.prompt.labels, first.encoded.lengths, first.encoded.max_length,
                    first.encoded.word_tokens):
                raise UserError("the members' prompts must share the verbalizer and max_length (only patterns may "
                                 f"differ): {t.encoded.prompt.pattern!r} vs {first.encoded.prompt.pattern!r}.")
        self.graphdef, self.params, self.tasks, self.shared = graphdef, params, tasks, shared
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.backend = packing.truncating(tokenizer.backend_tokenizer, None)
        self.weights = np.full(len(tasks), 1.0 / len(tasks)) if weights is None else np.asarray(weights, np.float64)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.tasks[0].encoded.prompt.labels

    def member_probs(self, texts: Sequence[str]) -> np.ndarray:
        """(P, n, C) label probabilities of every member."""
        texts = packing.check_texts(texts)
        parts = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            b = packing.power_of_two(len(chunk), self.batch_size)
            encoded = [prompt_arrays(t, self.backend, chunk, b) for t in self.tasks]
            batches = {k: np.stack([e[k] for e in encoded]) for k in encoded[0]}
            probs = _prompt_ensemble(self.graphdef, self.params, batches, self.tasks[0], self.shared)
            parts.append(np.asarray(probs)[:, :len(chunk)])
        return np.concatenate(parts, axis=1)

    def fit_weights(self, texts: Sequence[str], labels: Sequence[int]) -> np.ndarray:
        """PET's weights: each member's accuracy on labelled examples, normalised to sum to 1."""
        accuracy = (self.member_probs(texts).argmax(-1) == np.asarray(labels)[None]).mean(-1)
        self.weights = accuracy / max(accuracy.sum(), 1e-12)
        return accuracy

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        return np.einsum("p,pnc->nc", self.weights, self.member_probs(texts))

    def classify(self, texts: Sequence[str]) -> list[dict]:
        return [{"label": self.labels[int(row.argmax())], "scores": [float(x) for x in row]}
                for row in self.probs(texts)]
