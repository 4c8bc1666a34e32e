"""The clean method: plain training on the task's loss (fine-tuning, pretraining), and the eval step that
every method shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import optax
from flax import nnx

from jaxopt_llm.parallel import global_sum
from jaxopt_llm.recipes import Context, Method, Recipe
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps.common import Metrics, apply_gradients, step_key


@dataclasses.dataclass(frozen=True)
class Clean:
    """The clean method has no options."""


def make_grad_fn(graphdef: nnx.GraphDef, task) -> Callable:
    """`grad_fn(params, batch, key, step) -> (grads, metrics)` of one clean step, this device's share: dropout
    (and MLM masks) from fold_in(key, step)."""

    def loss_fn(params, batch, prepared):  # first argument is what is differentiated
        model = nnx.merge(graphdef, params)
        out = task.forward(model, model.embed(prepared.input_ids), batch, prepared.extra, deterministic=False,
                           dropout_key=prepared.dropout_key)
        return task.loss(out, batch, prepared.extra)

    def grad_fn(params, batch: dict, key: jax.Array, step: jax.Array) -> tuple[dict, Metrics]:
        return jax.grad(loss_fn, has_aux=True)(params, batch, task.prepare(batch, step_key(key, step)))

    return grad_fn


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, task) -> Callable:
    """`train_step(state, batch, key, aux=None) -> (state, metrics)`: dropout (and MLM masks) from
    fold_in(key, state.step)."""
    grad_fn = make_grad_fn(graphdef, task)

    def train_step(state: TrainState, batch: dict, key: jax.Array, aux=None) -> tuple[TrainState, Metrics]:
        grads, metrics = grad_fn(state.params, batch, key, state.step)
        return apply_gradients(state, global_sum(grads), tx), global_sum(metrics)

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, task, select: Callable = lambda module: module) -> Callable:
    """`eval_step(params, batch, aux=None) -> metrics`, deterministic; `select(module)` is the `Bert` to
    evaluate (e.g. a distillation student's BERT)."""

    def eval_step(params, batch: dict, aux=None) -> Metrics:
        model = select(nnx.merge(graphdef, params))
        prepared = task.prepare(batch, None)
        out = task.forward(model, model.embed(prepared.input_ids), batch, prepared.extra)
        return global_sum(task.eval_metrics(out, batch, prepared.extra))

    return eval_step


def build(ctx: Context, options: Clean) -> Recipe:
    graphdef, params = nnx.split(ctx.load(ctx.model))
    return Recipe(task=ctx.task, tx=ctx.tx, graphdef=graphdef, params=params,
                  train_step=make_train_step(graphdef, ctx.tx, ctx.task),
                  eval_step=make_eval_step(graphdef, ctx.task), export=lambda p: nnx.merge(graphdef, p))


METHOD = Method("clean", Clean, build, help="train on the task's loss",
                commands={"finetune": None, "pretrain": "masked-lm", "prompt": "prompt"})  # finetune: the config's task
