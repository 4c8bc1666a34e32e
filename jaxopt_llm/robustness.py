"""Robustness evaluation: the accuracy a PGD attack on the word embeddings leaves, for a whole grid of
epsilons in one compiled function (a case of `jaxopt_llm.sweep`); `_correct_under_attack` is the
one-epsilon reference."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm.errors import UserError
from jaxopt_llm.steps.adversarial import Adversary, attack
from jaxopt_llm.steps.classify import ClassificationTask

_TASK = ClassificationTask()


def _correct_under_attack(graphdef, params, batch, epsilon, adv: Adversary):
    """(correct, count) for one batch after K PGD steps of size 2.5 * eps / K within the eps-ball."""
    model = nnx.merge(graphdef, params)
    emb = model.embed(batch["input_ids"])
    valid = batch["weight"] > 0

    def objective(p, delta):
        logits = _TASK.forward(nnx.merge(graphdef, p), emb + delta, batch, None)
        return jnp.sum(losses.cross_entropy(logits, batch["labels"], valid))

    found = attack(objective, params, emb.shape, batch["attention_mask"], adv, jax.random.key(0), epsilon)
    logits = _TASK.forward(model, emb + found.delta, batch, None)
    correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
    return losses.masked_sum(correct, valid)


def robust_accuracy(model, arrays: dict[str, np.ndarray], epsilons: Sequence[float], steps: int = 10,
                    norm: str = "linf", batch_size: int = 32) -> list[dict]:
    """Accuracy under an L2 / L-inf PGD attack of `steps` steps for each epsilon: [{epsilon, accuracy, n}],
    the whole grid in one compiled program (a one-model sweep, `jaxopt_llm.sweep`).

    `arrays`: tokenised eval data with labels (as from `jaxopt_llm.data.load`); epsilon 0 is clean accuracy.
    """
    from jaxopt_llm import sweep

    if model.classifier is None or model.config.num_labels < 2:
        raise UserError("robust_accuracy needs a sequence-classification model with at least 2 labels.")
    graphdef, params = nnx.split(model)
    stack = sweep.Stack(graphdef, jax.tree.map(lambda x: np.asarray(x)[None], params), ["model"], [None],
                        model.config.label_names, None, None)
    rows = sweep.evaluate(stack, arrays, (1.0,), list(epsilons), steps, norm, batch_size)
    n = len(next(iter(arrays.values())))
    return [{"epsilon": r["epsilon"], "accuracy": r["robust_accuracy"], "n": n} for r in rows if "epsilon" in r]


def plot(tables: dict[str, list[dict]], out: str, norm: str) -> None:
    """Accuracy vs epsilon, one line per named table, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, rows in tables.items():
        ax.plot([r["epsilon"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=name)
    ax.set_xlabel(f"epsilon ({norm} ball on word embeddings)")
    ax.set_ylabel("accuracy under PGD")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
