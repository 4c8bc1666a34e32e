"""The classification task: cross-entropy on class logits ([CLS] -> pooler -> classifier), or squared
error when the head has one output (regression). Reports loss, accuracy and macro-F1.

batch: input_ids, attention_mask, token_type_ids (b, t); labels (b,) int32 (float32 for regression);
weight (b,) float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm import losses
from jaxopt_llm import metrics as metrics_lib
from jaxopt_llm.parallel import global_mean
from jaxopt_llm.steps.common import Metrics, mean_metrics
from jaxopt_llm.steps.task import DataNeeds, Prepared, Targets


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    name: str = "classification"
    head: str = "sequence-classification"
    data: DataNeeds = DataNeeds(labels=True)

    def prepare(self, batch, key):
        return Prepared(batch["input_ids"], None, key)

    def forward(self, model, embeddings, batch, extra, *, deterministic=True, dropout_key=None, collect=None):
        """Class logits (b, c) float32; the last layer runs at the positions the head reads only ([CLS]; every
        token for mean pooling, or when collecting)."""
        k_encode, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        read = None if collect is not None else model.read_positions(embeddings.shape[0])
        hidden = model.encode(embeddings, batch["attention_mask"], batch["token_type_ids"],
                              deterministic=deterministic, dropout_key=k_encode, output_positions=read,
                              collect=collect)
        return model.classify_logits(hidden, deterministic=deterministic, dropout_key=k_head,
                                     attention_mask=batch["attention_mask"])

    def targets(self, logits, batch, extra):
        return Targets(logits, batch["labels"], batch["weight"] > 0)

    def loss(self, logits, batch, extra):
        valid = batch["weight"] > 0
        if logits.shape[-1] == 1:
            per_example = losses.squared_error(logits[:, 0], batch["labels"], valid)
            metrics = {}
        else:
            per_example = losses.cross_entropy(logits, batch["labels"], valid)
            correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
            metrics = {"accuracy": losses.masked_sum(correct, valid)}
        total, count = losses.masked_sum(per_example, valid)
        metrics["loss"] = (total, count)
        return global_mean(total, count), metrics

    def eval_metrics(self, logits, batch, extra):
        """loss (= NLL), accuracy, Brier, and the sums behind macro-F1 (confusion) and ECE (calibration)."""
        _, metrics = self.loss(logits, batch, extra)
        if logits.shape[-1] > 1:
            valid = batch["weight"] > 0
            probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
            count = metrics["loss"][1]
            metrics["confusion"] = (metrics_lib.confusion_matrix(logits, batch["labels"], batch["weight"]), count)
            metrics["calibration"] = (metrics_lib.bin_sums(probs, batch["labels"], batch["weight"]), count)
            metrics["brier"] = losses.masked_sum(metrics_lib.brier(probs, batch["labels"]), valid)
        return metrics

    def summarize(self, sums: Metrics) -> dict[str, float]:
        """Means, plus macro-F1 from the confusion matrix and ECE (15 bins) from the calibration sums;
        the loss is the NLL."""
        sums = dict(sums)
        confusion, bins = sums.pop("confusion", None), sums.pop("calibration", None)
        out = mean_metrics(sums)
        if confusion is not None:
            c = np.asarray(jax.device_get(confusion[0]), np.float64)
            out["f1"] = metrics_lib.macro_f1(c.reshape(-1, *c.shape[-2:]).sum(0))
        if bins is not None:
            b = np.asarray(jax.device_get(bins[0]), np.float64)
            out["ece"] = metrics_lib.ece_from_bins(b.reshape(-1, *b.shape[-2:]).sum(0))
        return out

    def files(self):
        return {}

    def baseline(self, train, eval):
        labels = train.get("labels")
        if labels is None or labels.dtype.kind == "f":
            return {}
        majority = np.bincount(labels).argmax()
        return {"majority_class_accuracy": float(np.mean(eval["labels"] == majority))}


def task_from_config(config, tokenizer) -> ClassificationTask:
    return ClassificationTask()
