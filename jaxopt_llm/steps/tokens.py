"""Token classification (named entities, tagging): a label per word, read at each word's first sub-token
(`token-classification.label_all_tokens`: every sub-token trains). Reports token accuracy and entity
precision / recall / F1 with exact spans, as seqeval's strict mode computes them for the run's scheme.

batch: input_ids, attention_mask, token_type_ids (b, t); labels (b, t) int32, -100 where a position has no
label (special tokens, padding, later sub-tokens); word_starts (b, t) int32, 1 at each word's first sub-token;
weight (b,) float32. Data: CoNLL-style files or JSON lines (`jaxopt_llm.data.tagged`), data.train_file and
optionally data.eval_file.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import losses
from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm.parallel import global_mean
from jaxopt_llm.steps.common import Metrics, encode_every_token, mean_metrics
from jaxopt_llm.steps.task import DataNeeds, Prepared, Targets


@dataclasses.dataclass(frozen=True)
class TokenOptions:
    """The task's options (config keys `token-classification.*`)."""

    scheme: str = "IOB2"  # the files' tagging scheme: IOB2 (BIO) | IOBES | IOB1 (read, then converted to IOB2)
    label_all_tokens: bool = False  # train every sub-token of a word, not only the first


OPTIONS = TokenOptions


@dataclasses.dataclass(frozen=True)
class TokenClassificationTask:
    options: TokenOptions = TokenOptions()
    labels: tuple[str, ...] = ()  # the tags in id order, bound once the data is read
    name: str = "token-classification"
    head: str = "token-classification"

    @property
    def scheme(self) -> str:
        return "IOB2" if self.options.scheme == "IOB1" else self.options.scheme

    @property
    def data(self) -> DataNeeds:
        return DataNeeds(labels=True, load=self.load)

    def bind(self, labels: tuple[str, ...]) -> TokenClassificationTask:
        """This task once the run's tags are known (which ids open, continue and close an entity)."""
        return dataclasses.replace(self, labels=tuple(labels))

    def load(self, cfg, tokenizer, *, names=None, seed: int = 0):
        from jaxopt_llm import data as data_lib
        from jaxopt_llm.data import tagged
        from jaxopt_llm.data.batches import hold_out

        if cfg.dataset or not cfg.train_file:
            raise data_lib.DataError("token classification reads data.train_file (and data.eval_file): CoNLL-style "
                                     "files or JSON lines of tokens and tags; hub datasets are not read for it.")
        read = {w: tagged.check(tagged.read(f), self.options.scheme, str(f))
                for w, f in (("train", cfg.train_file), ("eval", cfg.eval_file)) if f}
        reports = [data_lib.LoadReport(str(f), rows=len(read[w]))
                   for w, f in (("train", cfg.train_file), ("eval", cfg.eval_file)) if f]
        train = read["train"][:cfg.max_train_examples] if cfg.max_train_examples else read["train"]
        splits = dict(zip(("train", "eval"), hold_out(train, read.get("eval"), cfg.eval_fraction,
                                                      cfg.max_eval_examples)))
        found = tagged.label_names(splits["train"])
        names = tuple(names) if names and set(found) <= set(names) else found
        arrays = {w: tagged.align(tokenizer, s, names, cfg.max_length, self.options.label_all_tokens)
                  for w, s in splits.items()}
        texts = {w: np.asarray([" ".join(x.words) for x in s], object) for w, s in splits.items()}
        return data_lib.Data(arrays["train"], arrays["eval"], names, reports, texts)

    def prepare(self, batch, key):
        return Prepared(batch["input_ids"], None, key)

    def forward(self, model, embeddings, batch, extra, *, deterministic=True, dropout_key=None, collect=None):
        """Tag logits (b, t, c) float32 at every position."""
        hidden, k_head = encode_every_token(model, embeddings, batch, deterministic, dropout_key, collect)
        return model.token_logits(hidden, deterministic=deterministic, dropout_key=k_head)

    def _where(self, batch):
        return (batch["labels"] >= 0) & (batch["weight"] > 0)[:, None]

    def targets(self, logits, batch, extra):
        return Targets(logits, jnp.maximum(batch["labels"], 0), self._where(batch))

    def loss(self, logits, batch, extra):
        where = self._where(batch)
        labels = jnp.maximum(batch["labels"], 0)
        total, count = losses.masked_sum(losses.cross_entropy(logits, labels, where), where)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return global_mean(total, count), {"loss": (total, count), "accuracy": losses.masked_sum(correct, where)}

    def eval_metrics(self, logits, batch, extra):
        """loss, token accuracy, and the entity counts behind precision / recall / F1."""
        _, metrics = self.loss(logits, batch, extra)
        prefix, kind = metrics_lib.tag_tables(self.labels, self.scheme)
        starts = (batch["word_starts"] > 0) & (batch["weight"] > 0)[:, None]
        sums = metrics_lib.entity_sums(batch["labels"], jnp.argmax(logits, -1), starts, prefix, kind, self.scheme)
        metrics["entities"] = (sums, jnp.ones((), jnp.float32))
        return metrics

    def summarize(self, sums: Metrics) -> dict[str, float]:
        sums = dict(sums)
        entities = sums.pop("entities", None)
        out = mean_metrics(sums)
        if entities is not None:
            tp, predicted, true = np.asarray(jax.device_get(entities[0]), np.float64).reshape(-1, 3).sum(0)
            scores = metrics_lib.prf(tp, predicted, true)
            out.update(precision=scores["precision"], recall=scores["recall"], f1=scores["f1"])
        return out

    def baseline(self, train, eval):
        where = eval["labels"] >= 0
        return {"all_o_token_accuracy": float(np.mean(eval["labels"][where] == 0))}

    def files(self):
        return {"tagging.json": {"scheme": self.scheme, "labels": list(self.labels)}}


def task_from_config(config, tokenizer) -> TokenClassificationTask:
    options = config.task_options if isinstance(config.task_options, TokenOptions) else TokenOptions()
    return TokenClassificationTask(options)
