"""Prediction with fixed padded shapes: fill-mask, classify, sentence embeddings.

Inputs are padded to a length bucket and a power-of-two batch, so new texts reuse the compiled
programs: at most one compile per (bucket, batch size) pair, never one per call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm.bert.modeling import Bert
from jaxopt_llm.bert.params import from_pretrained, load_tokenizer, resolve, task_of

# Padded lengths: steps of 8 tokens up to 64, then 16, 32, 64: a text gains at most 7 pad tokens up to 64
# tokens, at most 25 % beyond that.
LENGTH_BUCKETS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
_HEADS = {"sequence-classification": ("classifier",), "masked-lm": ("mlm",), "pretraining": ("mlm",)}


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _fill_mask(graphdef, state, ids_bt, mask_bt, types_bt, positions_bp, top_k):
    model = nnx.merge(graphdef, state)
    hidden_bpd = model.encode(model.embed(ids_bt), mask_bt, types_bt, output_positions=positions_bp)
    probs_bpv = jax.nn.softmax(model.mlm_logits(hidden_bpd), axis=-1)  # vocabulary only at [MASK] positions
    return jax.lax.top_k(probs_bpv, top_k)


def _logits(graphdef, state, ids_bt, mask_bt, types_bt):
    model = nnx.merge(graphdef, state)
    cls_b1 = jnp.zeros((ids_bt.shape[0], 1), jnp.int32)  # the last layer only at [CLS], the one position read
    return model.classify_logits(model.encode(model.embed(ids_bt), mask_bt, types_bt, output_positions=cls_b1))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _classify(graphdef, state, ids_bt, mask_bt, types_bt, temperature=1.0):
    """Probabilities softmax(logits / temperature) (b, c); the raw value for regression."""
    logits = _logits(graphdef, state, ids_bt, mask_bt, types_bt)
    return logits if logits.shape[-1] == 1 else jax.nn.softmax(logits / temperature, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "how"))
def _ensemble_classify(graphdef, stacked, ids_bt, mask_bt, types_bt, how, temperature=1.0):
    """(combined probabilities (b, c), members' probabilities (N, b, c)) in one program: vmap over members."""
    from jaxopt_llm.steps.ensemble import combine

    logits = jax.vmap(lambda p: _logits(graphdef, p, ids_bt, mask_bt, types_bt))(stacked)
    probs = combine(logits, how)  # calibration scales the ensemble's log-probabilities, as calibrate fitted it
    return jax.nn.softmax(jnp.log(jnp.maximum(probs, 1e-30)) / temperature, -1), jax.nn.softmax(logits, -1)


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def _embed(graphdef, state, ids_bt, mask_bt, types_bt, normalize):
    model = nnx.merge(graphdef, state)
    hidden_btd = model.encode(model.embed(ids_bt), mask_bt, types_bt).astype(jnp.float32)
    weights_bt1 = mask_bt[..., None].astype(jnp.float32)
    mean_bd = (hidden_btd * weights_bt1).sum(1) / jnp.maximum(weights_bt1.sum(1), 1e-9)
    if normalize:
        mean_bd = mean_bd / jnp.maximum(jnp.linalg.norm(mean_bd, axis=-1, keepdims=True), 1e-12)
    return mean_bd


def _prompt_probs(graphdef, state, batch, task, temperature=1.0):
    model = nnx.merge(graphdef, state)
    prepared = task.prepare(batch, None)
    return jax.nn.softmax(task.forward(model, model.embed(prepared.input_ids), batch, None) / temperature, axis=-1)


_prompt_classify = jax.jit(_prompt_probs, static_argnames=("graphdef", "task"))


@functools.partial(jax.jit, static_argnames=("graphdef", "task", "shared"))
def _prompt_ensemble(graphdef, params, batches, task, shared):
    """(P, b, C) probabilities of P (model, pattern) members in one program: vmap over the member axis of
    the encoded batches, and of the parameters unless they are `shared` by every member."""
    def member(p, batch):
        return _prompt_probs(graphdef, p, batch, task)

    return jax.vmap(member, in_axes=(None if shared else 0, 0))(params, batches)


def compile_count() -> int:
    """Programs compiled so far by this module's jitted functions (for tests and logs)."""
    return sum(f._cache_size() for f in (_fill_mask, _classify, _embed, _prompt_classify, _prompt_ensemble,
                                         _ensemble_classify))


def _pad_rows(arrays: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """Rows padded (with copies of the first row) to the batch size b: fixed shapes, no recompiles."""
    n = len(next(iter(arrays.values())))
    return {k: np.concatenate([v, np.repeat(v[:1], b - n, 0)]) if b > n else v for k, v in arrays.items()}


def prompt_task(prompt, tokenizer, max_length: int = 128):
    """A PromptTask for prediction from a `Prompt` (zero-shot with any MLM model)."""
    from jaxopt_llm.steps.prompt import PromptTask, encode_prompt

    return PromptTask(encode_prompt(prompt, tokenizer, max_length), tokenizer)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


class Predictor:
    """A `Bert` and its tokenizer, predicting in fixed-shape batches.

    >>> p = Predictor.from_pretrained("bert-base-uncased", task="masked-lm")
    >>> p.fill_mask(["The [MASK] runs through the park."], top_k=5)
    """

    def __init__(self, model: Bert, tokenizer: Any, *, batch_size: int = 32,
                 length_buckets: Sequence[int] = LENGTH_BUCKETS, prompt: Any = None, temperature: float = 1.0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1.")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prompt = prompt  # a PromptTask: classify() by cloze prompt on the MLM head
        self.temperature = float(temperature)  # calibration: probabilities are softmax(logits / temperature)
        max_len = model.config.max_position_embeddings
        self.length_buckets = tuple(b for b in sorted(length_buckets) if b < max_len) + (max_len,)
        self.graphdef, self.state = nnx.split(model)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, task: str | None = None, *, prompt: Any = None,
                        max_length: int = 128, allow_untrained_head: bool = False, **kwargs: Any) -> Predictor:
        """From any model reference (run folder, HF folder, hub id, packaged name); `task` None: the one the
        checkpoint was saved for. A head the checkpoint lacks is refused unless `allow_untrained_head`.

        Prompt classification: a run folder with prompt.json classifies with its prompt; `prompt` (a
        `steps.prompt.Prompt`) classifies zero-shot with any MLM checkpoint (texts cut to `max_length`)."""
        from jaxopt_llm.runs import RunFolder
        from jaxopt_llm.steps import prompt as prompt_lib

        run = RunFolder.of(name_or_path)
        if run is not None:  # a run folder's fitted temperature, unless the caller sets one
            kwargs.setdefault("temperature", run.temperature())
        if run is not None and run.members():
            return EnsemblePredictor.from_runs(run.members(), **kwargs)
        folder = resolve(name_or_path)
        record = run.read("prompt.json") if run is not None else None
        if (prompt is not None or record is not None) and task in (None, "sequence-classification"):
            task = "masked-lm"
        task = task or task_of(folder)
        required = () if allow_untrained_head else _HEADS.get(task, ())
        model = from_pretrained(folder, task, required=required)
        tokenizer = load_tokenizer(folder, model.config.vocab_size)
        if prompt is not None:
            if max_length > model.config.max_position_embeddings:
                raise ValueError(f"max_length={max_length} is more than the model's "
                                 f"{model.config.max_position_embeddings} positions.")
            kwargs["prompt"] = prompt_task(prompt, tokenizer, max_length)
        elif record is not None:
            kwargs["prompt"] = prompt_lib.from_json(record, tokenizer)
        return cls(model, tokenizer, **kwargs)

    def _batches(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(rows of `texts`, padded arrays) in order of token length: each batch is padded to the smallest
        bucket that holds its longest text and to a power-of-two size, so similar lengths share a batch and
        new texts reuse compiled programs."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string.")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        enc = tok(list(texts), truncation=True, max_length=self.length_buckets[-1])
        order = np.argsort([len(x) for x in enc["input_ids"]], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            t = _bucket(max(len(enc["input_ids"][r]) for r in rows), self.length_buckets)
            b = min(self.batch_size, 1 << (len(rows) - 1).bit_length())
            arrays = {"ids": np.full((b, t), pad, np.int32), "mask": np.zeros((b, t), np.int32),
                      "types": np.zeros((b, t), np.int32)}
            for i, r in enumerate(rows):
                ids = enc["input_ids"][r]
                arrays["ids"][i, :len(ids)] = ids
                arrays["mask"][i, :len(ids)] = 1
                if "token_type_ids" in enc:
                    arrays["types"][i, :len(ids)] = enc["token_type_ids"][r]
            yield rows, arrays

    def _map(self, texts: Sequence[str], fn) -> np.ndarray:
        """fn(arrays) -> (b, ...) outputs of every batch, gathered back into the order of `texts`."""
        out = None
        for rows, arrays in self._batches(texts):
            values = np.asarray(fn(arrays))[:len(rows)]
            if out is None:
                out = np.zeros((len(texts), *values.shape[1:]), values.dtype)
            out[rows] = values
        return out

    def fill_mask(self, texts: Sequence[str], top_k: int = 5) -> list[list[dict] | list[list[dict]]]:
        """Top-k tokens for each [MASK]: per text a list of {token, token_id, score}; a list of such
        lists when the text has several masks."""
        self._need("mlm", "masked-lm")
        mask_id = self.tokenizer.mask_token_id
        if top_k < 1 or top_k > self.model.config.vocab_size:
            raise ValueError(f"top_k={top_k}: must be between 1 and vocab_size={self.model.config.vocab_size}.")
        results = [None] * len(texts)
        for rows, a in self._batches(texts):
            where = [np.flatnonzero(row == mask_id) for row in a["ids"][:len(rows)]]
            for r, w in zip(rows, where):
                if not len(w):
                    raise ValueError(f"text {texts[r]!r} has no {self.tokenizer.mask_token} token "
                                     "(or it was cut off at the maximum length): fill-mask needs one.")
            p = _bucket(max(len(w) for w in where), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
            positions = np.zeros((a["ids"].shape[0], p), np.int32)
            for i, w in enumerate(where):
                positions[i, :len(w)] = w[:p]
            scores, ids = jax.device_get(_fill_mask(self.graphdef, self.state, a["ids"], a["mask"],
                                                    a["types"], positions, top_k))
            for i, (r, w) in enumerate(zip(rows, where)):
                per_mask = [[{"token": self.tokenizer.convert_ids_to_tokens(int(t)), "token_id": int(t),
                              "score": float(s)} for t, s in zip(ids[i, j], scores[i, j])]
                            for j in range(len(w))]
                results[r] = per_mask[0] if len(per_mask) == 1 else per_mask
        return results

    def classify(self, texts: Sequence[str]) -> list[dict]:
        """Per text {label, scores}: softmax probabilities in label order (the raw value for regression)."""
        if self.prompt is not None:
            return self._classify_prompt(texts)
        self._need("classifier", "sequence-classification")
        names = self.model.config.label_names
        scores = self._map(texts, lambda a: _classify(self.graphdef, self.state, a["ids"], a["mask"], a["types"],
                                                      self.temperature))
        return [{"label": None if len(names) == 1 else names[int(row.argmax())], "scores": [float(s) for s in row]}
                for row in scores]

    def _classify_prompt(self, texts: Sequence[str]) -> list[dict]:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string.")
        names = self.prompt.encoded.prompt.labels
        results = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            b = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
            batch = _pad_rows(self.prompt.encode(chunk), b)
            probs = np.asarray(_prompt_classify(self.graphdef, self.state, batch, self.prompt,
                                                self.temperature))[:len(chunk)]
            results += [{"label": names[int(row.argmax())], "scores": [float(x) for x in row]} for row in probs]
        return results

    def embed(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        """Mean-pooled last hidden states (n, d), L2-normalised by default (sentence-transformers' recipe)."""
        return self._map(texts, lambda a: _embed(self.graphdef, self.state, a["ids"], a["mask"], a["types"],
                                                 normalize))

    def _need(self, module: str, task: str) -> None:
        if getattr(self.model, module) is None:
            raise ValueError(f"this model was loaded with task={self.model.task!r}; load it with task={task!r}.")


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
                raise ValueError("the members' prompts must share the verbalizer and max_length (only patterns may "
                                 f"differ): {t.encoded.prompt.pattern!r} vs {first.encoded.prompt.pattern!r}.")
        self.graphdef, self.params, self.tasks, self.shared = graphdef, params, tasks, shared
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.weights = np.full(len(tasks), 1.0 / len(tasks)) if weights is None else np.asarray(weights, np.float64)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.tasks[0].encoded.prompt.labels

    @classmethod
    def from_model(cls, name_or_path, prompts: list, max_length: int = 128, **kwargs) -> PromptEnsemble:
        """One MLM model, several patterns (zero-shot)."""
        folder = resolve(name_or_path)
        model = from_pretrained(folder, "masked-lm", required=("mlm",))
        tokenizer = load_tokenizer(folder, model.config.vocab_size)
        graphdef, params = nnx.split(model)
        return cls(graphdef, params, [prompt_task(p, tokenizer, max_length) for p in prompts], tokenizer, shared=True,
                   **kwargs)

    @classmethod
    def from_runs(cls, runs: list, **kwargs) -> PromptEnsemble:
        """Prompt runs (each fine-tuned with its pattern), their parameters stacked on a member axis."""
        from jaxopt_llm.runs import RunFolder
        from jaxopt_llm.steps import prompt as prompt_lib

        models, tasks, tokenizer = [], [], None
        for run in runs:
            record = RunFolder.of(run).read("prompt.json") if RunFolder.of(run) is not None else None
            if record is None:
                raise ValueError(f"{run!r} is not a prompt run folder (no prompt.json); train one with "
                                 "`jaxopt-llm prompt`.")
            folder = resolve(run)
            models.append(from_pretrained(folder, "masked-lm", required=("mlm",)))
            tokenizer = tokenizer or load_tokenizer(folder, models[-1].config.vocab_size)
            tasks.append(prompt_lib.from_json(record, tokenizer))
        graphdef, params = stack_models(models, runs)
        return cls(graphdef, params, tasks, tokenizer, shared=False, **kwargs)

    def member_probs(self, texts: Sequence[str]) -> np.ndarray:
        """(P, n, C) label probabilities of every member."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string.")
        parts = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            b = min(self.batch_size, 1 << (len(chunk) - 1).bit_length())
            encoded = [_pad_rows(t.encode(chunk), b) for t in self.tasks]
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


def stack_models(models: list, names: list) -> tuple[Any, Any]:
    """(graphdef, parameters stacked on a leading member axis) of models of one architecture."""
    graphdef, first = nnx.split(models[0])
    states = [first]
    for model, name in zip(models[1:], names[1:]):
        _, state = nnx.split(model)
        if jax.tree.structure(state) != jax.tree.structure(first) or (
                jax.tree.map(np.shape, state) != jax.tree.map(np.shape, first)):
            raise ValueError(f"{name!r} and {names[0]!r} differ in architecture (layers, sizes or heads); members "
                             "of one ensemble must share it.")
        states.append(state)
    return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states)


class EnsemblePredictor(Predictor):
    """Members of one architecture and label set, stacked on a leading axis and predicted in one program.
    classify() combines them by mean probability (default), mean logit or vote; `member_probs` gives each
    member's probabilities."""

    def __init__(self, graphdef, stacked, config, tokenizer, *, combine: str = "mean-prob", temperature: float = 1.0,
                 batch_size: int = 32, length_buckets: Sequence[int] = LENGTH_BUCKETS):
        from jaxopt_llm.steps.ensemble import COMBINE

        if combine not in COMBINE:
            raise ValueError(f"combine={combine!r}: use one of {COMBINE}.")
        self.model = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], stacked))  # member 0, for its config
        self.graphdef, self.state, self.tokenizer, self.batch_size = graphdef, stacked, tokenizer, batch_size
        self.combine, self.temperature, self.prompt = combine, float(temperature), None
        self.members = len(jax.tree.leaves(stacked)[0])
        max_len = config.max_position_embeddings
        self.length_buckets = tuple(b for b in sorted(length_buckets) if b < max_len) + (max_len,)

    @classmethod
    def from_runs(cls, runs: Sequence, **kwargs: Any) -> EnsemblePredictor:
        """Stack separately trained classification runs (seeds, adversarial models, ...): one architecture
        and one label set, else one error naming the two runs that differ."""
        models = [from_pretrained(resolve(r), "sequence-classification", required=("classifier",)) for r in runs]
        graphdef, stacked = stack_models(models, [str(r) for r in runs])
        for r, m in zip(runs[1:], models[1:]):
            if m.config.label_names != models[0].config.label_names:
                raise ValueError(f"{str(r)!r} has labels {list(m.config.label_names)} but {str(runs[0])!r} has "
                                 f"{list(models[0].config.label_names)}: members of one ensemble share one label set.")
        tokenizer = load_tokenizer(resolve(runs[0]), models[0].config.vocab_size)
        return cls(graphdef, stacked, models[0].config, tokenizer, **kwargs)

    def member_probs(self, texts: Sequence[str]) -> np.ndarray:
        """(N, n, c) every member's probabilities."""
        return self._run(texts)[1]

    def _run(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        def both(a):  # (b, c) combined and (b, N, c) members: one leading batch axis for _map
            c, m = _ensemble_classify(self.graphdef, self.state, a["ids"], a["mask"], a["types"], self.combine,
                                      self.temperature)
            return np.concatenate([np.asarray(c)[:, None], np.swapaxes(np.asarray(m), 0, 1)], axis=1)

        out = self._map(texts, both)
        return out[:, 0], np.swapaxes(out[:, 1:], 0, 1)

    def classify(self, texts: Sequence[str]) -> list[dict]:
        names = self.model.config.label_names
        return [{"label": names[int(row.argmax())], "scores": [float(x) for x in row]} for row in self._run(texts)[0]]

    def fill_mask(self, texts, top_k=5):
        raise ValueError("an ensemble classifies; fill-mask needs one masked-LM model.")
