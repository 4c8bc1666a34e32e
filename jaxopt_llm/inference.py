"""The one loader for inference: any model reference becomes one `Inference` object.

    model = inference.load("runs/tweets/calibrated-1a2b3c")   # run folder, HF folder, hub id, artifact, gs://
    model.kind, model.labels, model.temperature, model.max_length
    model.probs(["a text", ...])          # (n, c), calibrated
    model.logits(["a text", ...])         # (n, c), uncalibrated: probs = softmax(logits / temperature)

What a reference holds is decided here and in `RunFolder.kind` only: a single classifier, an ensemble
(members stacked on one axis, one program), a cloze-prompt run, a masked LM, a bare encoder, or an exported
artifact (whose kind is its manifest's). How texts become arrays is `packing`'s one rule: cut to the model's
sequence length -- the `data.max_length` a run was trained with, a bare HF folder's positions unless
`max_length` says otherwise, an artifact's recorded length -- then padded to a bucket. Predict, sweeps,
calibration, label rounds, the pipeline's measurement, export and serve all load through `load`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxopt_llm import packing
from jaxopt_llm.calibration import softmax
from jaxopt_llm.errors import UserError
from jaxopt_llm.runs import RunFolder

KINDS = ("classifier", "ensemble", "prompt", "masked-lm", "encoder", "tagger", "reader")
_HEAD = {"classifier": "sequence-classification", "prompt": "masked-lm", "masked-lm": "masked-lm",
         "encoder": "base", "tagger": "token-classification", "reader": "question-answering"}
_REQUIRED = {"sequence-classification": ("classifier",), "masked-lm": ("mlm",), "pretraining": ("mlm",),
             "token-classification": ("classifier",), "question-answering": ("qa", "classifier")}
# the kind of a checkpoint saved for a head (its config.json's architectures); any other head: "encoder"
KIND_OF_TASK = {"sequence-classification": "classifier", "masked-lm": "masked-lm", "pretraining": "masked-lm",
                "token-classification": "tagger", "question-answering": "reader"}
# kinds that only their own command reads: loading them as another kind would graft a random head on
_OWN_COMMAND = {"tagger": ("token classifier", "tag texts with `jaxopt-llm predict ner` (inference.load(...).tag)"),
                "reader": ("question-answering model",
                           "answer questions with `jaxopt-llm predict qa` (inference.load(...).answer)")}
_QA_OPTIONS = ("stride", "max_answer_length", "no_answer")


def _refuse_other_kind(reference, held: str | None, kind: str | None) -> None:
    if held in _OWN_COMMAND and kind not in (None, held, "encoder"):
        what, command = _OWN_COMMAND[held]
        raise UserError(f"{str(reference)!r} holds a {what} (task={_HEAD[held]}), not a {kind}: {command}.")


def _reader_options(run) -> dict:
    """A reader run's windows and answer settings (its qa.json), or {}."""
    return {k: v for k, v in ((run.read("qa.json") if run is not None else None) or {}).items() if k in _QA_OPTIONS}


@dataclasses.dataclass
class Inference:
    """A loaded model for prediction. `engine` is a `predict.Predictor` / `EnsemblePredictor` or a
    `serving.artifact.Artifact`; every method here goes through it with the same encoding."""

    reference: str
    kind: str  # one of KINDS
    labels: tuple[str, ...]
    temperature: float
    max_length: int
    engine: Any
    tokenizer: Any  # a transformers tokenizer (a `tokenizers.Tokenizer` for an artifact)
    artifact: bool = False  # an exported artifact: its functions apply the temperature themselves
    members: tuple = ()  # an ensemble's member folders, in order
    options: dict = dataclasses.field(default_factory=dict)  # a reader's qa.json (stride, answer length, ...)

    # ---- token arrays ------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]):
        """(rows of texts, padded token arrays) batches: the arrays `logits_of` takes."""
        return self.engine.batches(texts)

    def logits_of(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(b, c) uncalibrated scores of token arrays (input_ids, attention_mask, token_type_ids)."""
        if self.artifact:
            probs, _ = self.engine.run(arrays)
            return self.temperature * np.log(np.clip(np.asarray(probs, np.float64), 1e-30, None))
        return np.asarray(self.engine.logits_of(arrays))

    def probs_of(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """(b, c) calibrated probabilities of token arrays."""
        if self.artifact:
            return np.asarray(self.engine.run(arrays)[0], np.float64)
        return softmax(self.logits_of(arrays), self.temperature)

    # ---- texts -------------------------------------------------------------------------------------------
    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """(n, c) uncalibrated scores: class logits, an ensemble's log mean probability, a prompt's label
        log-scores (up to a constant per row for an artifact)."""
        self._classifies()
        if self.artifact:
            return self.temperature * np.log(np.clip(self.probs(texts), 1e-30, None))
        return self.engine.logits(texts)

    def probs(self, texts: Sequence[str]) -> np.ndarray:
        """(n, c) probabilities softmax(logits / temperature); the raw value for a regression head."""
        self._classifies()
        if self.artifact:
            return np.asarray(self.engine.predict(packing.check_texts(texts))[0], np.float64)
        logits = self.engine.logits(texts)
        return logits if logits.shape[-1] == 1 else softmax(logits, self.temperature)

    def classify(self, texts: Sequence[str]) -> list[dict]:
        """Per text {label, scores}: probabilities in label order (label None for regression)."""
        probs = self.probs(texts)
        return [{"label": None if len(self.labels) < 2 else self.labels[int(row.argmax())],
                 "scores": [float(s) for s in row]} for row in probs]

    def tag(self, texts: Sequence[str], aggregation: str = "first") -> list[list[dict]]:
        """Per text, its entities {entity_group, score, word, start, end} (`tagging`; aggregation first,
        simple or none) -- a token classifier's (kind "tagger")."""
        if self.kind != "tagger":
            raise UserError(f"{self.reference!r} is a {self.kind}, not a token classifier: tag with a run, folder "
                            "or artifact of task=token-classification.")
        return self.engine.tag(texts, aggregation)

    def answer(self, questions: Sequence[str], contexts: Sequence[str], **options) -> list[dict]:
        """Per question its {answer, score, start, end} (`predict.Predictor.answer`) -- a reader's (kind
        "reader", task=question-answering); options: stride, max_answer_length, no_answer (default: the run's
        qa.json)."""
        if self.kind != "reader":
            raise UserError(f"{self.reference!r} is a {self.kind}, not a question-answering model.")
        if self.artifact:
            return self.engine.answer(questions, contexts, **options)
        return self.engine.answer(questions, contexts, **{**self.options, **options})

    def member_probs(self, texts: Sequence[str]) -> np.ndarray:
        """(N, n, c) an ensemble's members' probabilities (uncalibrated)."""
        if self.kind != "ensemble" or self.artifact:
            raise UserError(f"{self.reference!r} is a {self.kind}, not an ensemble run: it has no members.")
        return self.engine.member_probs(texts)

    def fill_mask(self, texts: Sequence[str], top_k: int = 5):
        if self.artifact:
            raise UserError(f"{self.reference!r} is an exported artifact: it classifies; fill-mask needs a "
                             "masked-LM run or model folder.")
        return self.engine.fill_mask(texts, top_k)

    def embed(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        if self.artifact:
            raise UserError(f"{self.reference!r} is an exported artifact; embed needs a model folder.")
        return self.engine.embed(texts, normalize)

    def parameters(self) -> int:
        import jax

        tree = self.engine.weights if self.artifact else self.engine.state
        return int(sum(np.size(x) for x in jax.tree.leaves(tree)))

    def _classifies(self) -> None:
        if self.kind in ("masked-lm", "encoder"):
            raise UserError(f"{self.reference!r} is a {self.kind} model with no classifier: fine-tune it "
                             "(jaxopt-llm finetune) or classify by cloze prompt (--pattern).")


def is_artifact(reference: str | os.PathLike) -> bool:
    """Whether `reference` (a local path or a bucket URL) is an exported artifact: a manifest.json and no
    config.json (a Hugging Face folder or a run's model/ has one)."""
    from jaxopt_llm import paths

    path = paths.Path(reference if paths.is_remote(reference) else os.path.expanduser(str(reference)))
    return (path / "manifest.json").is_file() and not (path / "config.json").is_file()


def load(reference: str | os.PathLike, *, kind: str | None = None, max_length: int | None = None,
         batch_size: int = 32, temperature: float | None = None, prompt: Any = None, combine: str = "mean-prob",
         allow_untrained_head: bool = False, verify: bool = True, backend: str = "jax") -> Inference:
    """The inference object of any model reference.

    kind: None for what the reference holds (a run folder's kind; an HF folder's saved head: a classifier,
    a masked LM or an encoder), or one of KINDS to load it as that ("masked-lm" for fill-mask on a
    classifier's folder, "encoder" for embeddings). `max_length`: cut texts to this many tokens instead of
    the reference's own length. `temperature`: None for the run's fitted one (1.0 if none). `prompt` (a
    `steps.prompt.Prompt`): classify zero-shot by cloze prompt with any MLM model. A head the checkpoint
    lacks is refused unless `allow_untrained_head`. An exported artifact runs on `backend` ("jax", or
    "onnxruntime" for one exported with format="onnx").
    """
    if kind is not None and kind not in KINDS:
        raise UserError(f"kind={kind!r}: use one of {', '.join(KINDS)}.")
    if max_length is not None and (isinstance(max_length, bool) or int(max_length) < 1):
        raise UserError(f"max_length={max_length!r}: must be a positive number of tokens.")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}: must be at least 1.")
    if is_artifact(reference):
        return _artifact(reference, kind, max_length, verify, backend)
    if backend != "jax":
        raise UserError(f"backend={backend!r} runs exported artifacts; {str(reference)!r} is not one. Export it "
                        "with `jaxopt-llm export RUN --out ART --format onnx`.")
    run = RunFolder.of(reference)
    held = run.kind() if run is not None else None
    _refuse_other_kind(reference, held, kind)
    if prompt is not None:
        held = "prompt"
    elif kind is not None and not (kind == "classifier" and held in ("ensemble", "prompt")):
        held = kind
    if run is not None and temperature is None:
        temperature = run.temperature()
    temperature = 1.0 if temperature is None else float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise UserError(f"temperature={temperature}: must be a finite number > 0.")
    if max_length is None and run is not None:
        max_length = run.max_length()
    options = dict(max_length=max_length, batch_size=batch_size)
    per_token = KIND_OF_TASK.get(run.task()) if held == "ensemble" else None
    if per_token in _OWN_COMMAND:  # taggers: the members' mean probabilities; readers: their mean span logits
        engine, tokenizer = ensemble_engine(run.members(), head=_HEAD[per_token], **options)
        labels = tuple(engine.model.config.label_names) if per_token == "tagger" else ()
        return Inference(str(reference), per_token, labels, 1.0, engine.max_length, engine, tokenizer,
                         members=tuple(run.members()), options=_reader_options(run))
    if held == "ensemble":
        return _ensemble(reference, run.members(), temperature, combine, options)
    return _single(reference, run, held, temperature, prompt, allow_untrained_head, options)


def _single(reference, run, held, temperature, prompt, allow_untrained_head, options) -> Inference:
    from jaxopt_llm.models import from_pretrained, load_tokenizer, resolve, task_of
    from jaxopt_llm.predict import Predictor, prompt_task
    from jaxopt_llm.steps import prompt as prompt_lib

    folder = resolve(reference)
    if held in (None, "classifier"):  # a folder's own head decides, or refuses a tagger / reader as classifier
        saved = KIND_OF_TASK.get(task_of(folder), "encoder")
        _refuse_other_kind(reference, saved, held)
        held = held or saved
    head = _HEAD[held]
    required = () if allow_untrained_head else _REQUIRED.get(head, ())
    model = from_pretrained(folder, head, required=required)
    tokenizer = load_tokenizer(folder, model.config.vocab_size)
    max_length = options["max_length"] or model.config.max_tokens
    if max_length > model.config.max_tokens:
        raise UserError(f"max_length={max_length} is more than the model's {model.config.max_tokens} "
                         f"positions ({folder}).")
    task = None
    if held == "prompt":
        record = run.read("prompt.json") if run is not None and prompt is None else None
        if record is not None:
            task = prompt_lib.from_json(record, tokenizer)
            max_length = task.encoded.max_length
        elif prompt is not None:
            task = prompt_task(prompt, tokenizer, max_length)
        else:
            raise UserError(f"{str(reference)!r} has no prompt.json: give a prompt (pattern and verbalizer) to "
                             "classify by cloze prompt.")
    engine = Predictor(model, tokenizer, max_length=max_length, batch_size=options["batch_size"], prompt=task)
    if task is not None:
        labels = tuple(task.encoded.prompt.labels)
    elif held in ("classifier", "tagger"):
        labels = tuple(model.config.label_names)
    else:
        labels = ()
    return Inference(str(reference), held, labels, temperature, max_length, engine, tokenizer,
                     options=_reader_options(run) if held == "reader" else {})


def _ensemble(reference, members: list, temperature, combine, options) -> Inference:
    engine, tokenizer = ensemble_engine(members, combine=combine, **options)
    return Inference(str(reference), "ensemble", tuple(engine.model.config.label_names), temperature,
                     engine.max_length, engine, tokenizer, members=tuple(members))


def ensemble(references: Sequence, *, combine: str = "mean-prob", max_length: int | None = None,
             batch_size: int = 32, temperature: float = 1.0) -> Inference:
    """Separately trained classifiers (run or model folders) as one ensemble `Inference`, predicted in one
    program; cut to `max_length` (default: the shortest sequence length among them)."""
    if max_length is None:
        lengths = [RunFolder.of(r).max_length() for r in references if RunFolder.of(r) is not None]
        max_length = min([n for n in lengths if n is not None], default=None)
    return _ensemble(",".join(map(str, references)), list(references), float(temperature), combine,
                     {"max_length": max_length, "batch_size": batch_size})


def ensemble_engine(references: Sequence, *, combine: str = "mean-prob", max_length: int | None = None,
                    batch_size: int = 32, head: str = "sequence-classification"):
    """(EnsemblePredictor, tokenizer) of classifiers (or taggers: `head`) of one architecture and label set,
    stacked on one axis; else one error naming the two that differ."""
    from flax import nnx

    from jaxopt_llm import metrics
    from jaxopt_llm.models import from_pretrained, load_tokenizer, resolve
    from jaxopt_llm.predict import EnsemblePredictor

    names = [str(r) for r in references]
    models = [from_pretrained(resolve(r), head, required=_REQUIRED[head]) for r in references]
    graphdef = nnx.split(models[0])[0]
    stacked = metrics.stack([nnx.split(m)[1] for m in models], names, error=UserError)
    for name, m in zip(names[1:], models[1:]):
        if m.config.label_names != models[0].config.label_names:
            raise UserError(f"{name!r} has labels {list(m.config.label_names)} but {names[0]!r} has "
                             f"{list(models[0].config.label_names)}: members of one ensemble share one label set.")
    tokenizer = load_tokenizer(resolve(references[0]), models[0].config.vocab_size)
    return EnsemblePredictor(graphdef, stacked, tokenizer, combine=combine, max_length=max_length,
                             batch_size=batch_size), tokenizer


def prompt_ensemble(model: str | None = None, prompts: Sequence = (), runs: Sequence = (), *,
                    max_length: int = 128, batch_size: int = 32):
    """A `predict.PromptEnsemble`: one MLM `model` with several `prompts` (zero-shot), or prompt `runs`
    (each fine-tuned with its pattern, parameters stacked on one axis)."""
    from flax import nnx

    from jaxopt_llm import metrics
    from jaxopt_llm.models import from_pretrained, load_tokenizer, resolve
    from jaxopt_llm.predict import PromptEnsemble, prompt_task
    from jaxopt_llm.steps import prompt as prompt_lib

    if model is not None:
        folder = resolve(model)
        m = from_pretrained(folder, "masked-lm", required=("mlm",))
        tokenizer = load_tokenizer(folder, m.config.vocab_size)
        graphdef, params = nnx.split(m)
        return PromptEnsemble(graphdef, params, [prompt_task(p, tokenizer, max_length) for p in prompts], tokenizer,
                              shared=True, batch_size=batch_size)
    models, tasks, tokenizer = [], [], None
    for ref in runs:
        run = RunFolder.of(ref)
        if run is None or run.kind() != "prompt":
            raise UserError(f"{str(ref)!r} is not a prompt run folder (no prompt.json); train one with "
                             "`jaxopt-llm prompt`.")
        folder = resolve(ref)
        models.append(from_pretrained(folder, "masked-lm", required=("mlm",)))
        tokenizer = tokenizer or load_tokenizer(folder, models[-1].config.vocab_size)
        tasks.append(prompt_lib.from_json(run.read("prompt.json"), tokenizer))
    graphdef = nnx.split(models[0])[0]
    params = metrics.stack([nnx.split(m)[1] for m in models], [str(r) for r in runs], error=UserError)
    return PromptEnsemble(graphdef, params, tasks, tokenizer, shared=False, batch_size=batch_size)


def _artifact(reference, kind, max_length, verify, backend) -> Inference:
    from jaxopt_llm.serving.artifact import Artifact

    artifact = Artifact.load(reference, verify=verify, backend=backend)
    held = artifact.manifest["kind"]
    _refuse_other_kind(reference, held, kind)
    if kind not in (None, "classifier", held):
        raise UserError(f"{str(reference)!r} is an exported {held} artifact; it cannot be loaded as a {kind}.")
    if max_length is not None and int(max_length) != artifact.max_length:
        raise UserError(f"max_length={max_length}: the artifact {str(reference)!r} was exported for "
                         f"{artifact.max_length} tokens; export the run again for another length.")
    return Inference(str(reference), held, tuple(artifact.labels), float(artifact.manifest.get("temperature", 1.0)),
                     artifact.max_length, artifact, artifact.tokenizer, artifact=True)
