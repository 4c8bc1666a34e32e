"""Extractive question answering (SQuAD): start and end logits over the tokens of question + context windows;
cross-entropy of the answer's first and last token (both [CLS] where a window does not hold the answer).
Training eval reports the loss and how often a window's start, end and both are found; exact match and F1
over answers (`metrics.squad_scores`, the official script's computation) come from `jaxopt-llm predict qa
--data FILE`, which joins a question's windows (`answers`).

batch: input_ids, attention_mask, token_type_ids (b, t); start_positions, end_positions (b,) int32; weight.
Data: SQuAD-format JSON (`jaxopt_llm.data.squad`) in data.train_file and optionally data.eval_file.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxopt_llm import losses
from jaxopt_llm.parallel import global_mean
from jaxopt_llm.steps.common import Metrics, encode_every_token, mean_metrics
from jaxopt_llm.steps.task import DataNeeds, Prepared, Targets


@dataclasses.dataclass(frozen=True)
class QAOptions:
    """The task's options (config keys `question-answering.*`)."""

    stride: int = 32  # tokens two windows of one context share
    max_answer_length: int = 30  # tokens, at prediction
    no_answer: bool = False  # questions may have no answer (SQuAD 2.0): predict "" when [CLS] wins


OPTIONS = QAOptions


@dataclasses.dataclass(frozen=True)
class QuestionAnsweringTask:
    options: QAOptions = QAOptions()
    name: str = "question-answering"
    head: str = "question-answering"

    @property
    def data(self) -> DataNeeds:
        return DataNeeds(labels=False, load=self.load)

    def load(self, cfg, tokenizer, *, names=None, seed: int = 0):
        from jaxopt_llm import answers, packing
        from jaxopt_llm import data as data_lib
        from jaxopt_llm.data import squad
        from jaxopt_llm.data.batches import hold_out

        if cfg.dataset or not cfg.train_file:
            raise data_lib.DataError("question answering reads data.train_file (and data.eval_file): SQuAD-format "
                                     "JSON files; hub datasets are not read for it.")
        answers.check_stride(self.options.stride, cfg.max_length)
        read = {w: squad.read(f) for w, f in (("train", cfg.train_file), ("eval", cfg.eval_file)) if f}
        train = read["train"][:cfg.max_train_examples] if cfg.max_train_examples else read["train"]
        splits = dict(zip(("train", "eval"), hold_out(train, read.get("eval"), cfg.eval_fraction,
                                                      cfg.max_eval_examples)))
        arrays, texts, reports = {}, {}, []
        for which, questions in splits.items():
            rows, example_of, offsets = packing.qa_windows(tokenizer, [q.question for q in questions],
                                                           [q.context for q in questions], cfg.max_length,
                                                           self.options.stride)
            rows["start_positions"], rows["end_positions"] = squad.positions(questions, example_of, offsets)
            arrays[which] = rows
            texts[which] = np.asarray([questions[int(e)].question for e in example_of], object)
            reports.append(data_lib.LoadReport(f"{which}: {len(questions)} questions in {len(example_of)} windows",
                                               rows=len(questions)))
        return data_lib.Data(arrays["train"], arrays["eval"], None, reports, texts)

    def prepare(self, batch, key):
        return Prepared(batch["input_ids"], None, key)

    def forward(self, model, embeddings, batch, extra, *, deterministic=True, dropout_key=None, collect=None):
        """(b, 2, t) float32: start and end logits over the tokens."""
        hidden, k_head = encode_every_token(model, embeddings, batch, deterministic, dropout_key, collect)
        start, end = model.span_logits(hidden, deterministic=deterministic, dropout_key=k_head)
        keep = (batch["attention_mask"] > 0)[:, None, :]  # padding is never an answer
        return jnp.where(keep, jnp.stack([start, end], 1), jnp.finfo(jnp.float32).min)

    def targets(self, logits, batch, extra):
        labels = jnp.stack([batch["start_positions"], batch["end_positions"]], 1)
        return Targets(logits, labels, jnp.broadcast_to((batch["weight"] > 0)[:, None], labels.shape))

    def loss(self, logits, batch, extra):
        t = self.targets(logits, batch, extra)
        per = losses.cross_entropy(logits, t.labels, t.where)  # (b, 2)
        total, count = losses.masked_sum(per.mean(-1), t.where[:, 0])
        hit = jnp.argmax(logits, -1) == t.labels  # (b, 2)
        valid = t.where[:, 0]
        return global_mean(total, count), {
            "loss": (total, count), "start_accuracy": losses.masked_sum(hit[:, 0].astype(jnp.float32), valid),
            "end_accuracy": losses.masked_sum(hit[:, 1].astype(jnp.float32), valid),
            "span_accuracy": losses.masked_sum(jnp.all(hit, -1).astype(jnp.float32), valid)}

    def eval_metrics(self, logits, batch, extra):
        return self.loss(logits, batch, extra)[1]

    def summarize(self, sums: Metrics) -> dict[str, float]:
        return mean_metrics(dict(sums))

    def baseline(self, train, eval):
        return {"no_answer_window_share": float(np.mean(eval["start_positions"] == 0))}

    def files(self):
        return {"qa.json": dataclasses.asdict(self.options)}


def task_from_config(config, tokenizer) -> QuestionAnsweringTask:
    options = config.task_options if isinstance(config.task_options, QAOptions) else QAOptions()
    return QuestionAnsweringTask(options)
