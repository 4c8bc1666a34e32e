"""Knowledge distillation: a student learns from a teacher's softened predictions (and, optionally, its
hidden states and attention maps, TinyBERT-style) in one jitted step.

`train_step(state, batch, key, aux) -> (state, metrics)` with aux = {"teachers": {name: params}}: the
teachers' parameters are an argument (never closed over, so they are not baked into the program, and
never checkpointed with the student), run in eval mode and wrapped in stop_gradient. Teacher and student may
differ in family (`distill.student`, e.g. BERT -> DistilBERT), depth and width, never in vocabulary; widths are
bridged by a learned projection of the student's hidden states.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm.errors import UserError
from jaxopt_llm.models.bert.modeling import Bert, BertConfig
from jaxopt_llm.parallel import global_mean, global_sum
from jaxopt_llm.recipes import Context, Method, Recipe
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps import clean
from jaxopt_llm.steps.common import Metrics, apply_gradients, step_key


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The distillation method's options (config keys `distill.*`)."""

    teacher: str | None = None  # model reference(s) of the teacher(s), comma-separated: run folder, HF folder, ...
    student: str | None = None  # a model reference that is the student as it is (any family, its own weights)
    student_layers: int = 2  # students made from the teacher (no distill.student)
    init: str = "teacher-layers"  # teacher-layers (every k-th layer, DistilBERT) | random
    alpha: float = 0.5  # weight of the soft (teacher) term; 0 is plain training on labels
    temperature: float = 2.0  # softmax temperature of both sides in the soft term (its gradient scaled by T^2)
    hidden_weight: float = 0.0  # MSE between (projected) student and teacher hidden states
    attention_weight: float = 0.0  # MSE between attention probabilities

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"distill.alpha={self.alpha}: must be in [0, 1].")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise UserError(f"distill.temperature={self.temperature}: must be a finite number > 0.")
        for name in ("hidden_weight", "attention_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"distill.{name}={value}: must be a finite number >= 0.")
        if self.init not in ("teacher-layers", "random"):
            raise UserError(f"distill.init={self.init!r}: use teacher-layers or random.")
        if self.student_layers < 1:
            raise UserError(f"distill.student_layers={self.student_layers}: must be at least 1.")

    def check(self) -> None:
        """What a run needs beyond valid values (called once, when the config is validated)."""
        if not self.teachers:
            raise UserError("distillation needs distill.teacher: a run folder written by finetune, an HF folder "
                             "or a hub id (several, comma-separated, are averaged).")

    @property
    def teachers(self) -> list[str]:
        """The teachers' model references; an ensemble run stands for its members (the student then learns
        the members' mean distribution)."""
        from jaxopt_llm.runs import RunFolder

        out = []
        for ref in (t.strip() for t in (self.teacher or "").split(",") if t.strip()):
            run = RunFolder.of(ref)
            out += [str(m) for m in run.members()] if run is not None and run.kind() == "ensemble" else [ref]
        return out


class Student(nnx.Module):
    """The student BERT plus what only distillation trains: the projection of its hidden states to the
    teacher's width (identity-initialised when the widths match, absent when no hidden loss is used)."""

    def __init__(self, bert: Bert, teacher_width: int, hidden_loss: bool, *, rngs: nnx.Rngs):
        self.bert = bert
        width = bert.config.hidden_size
        init = nnx.initializers.constant(np.eye(width)) if width == teacher_width else nnx.initializers.lecun_normal()
        self.projection = nnx.Linear(width, teacher_width, kernel_init=init, rngs=rngs) if hidden_loss else None


def student_config(teacher: BertConfig, num_hidden_layers: int, **changes) -> BertConfig:
    """The teacher's config with fewer layers (and any other change, e.g. hidden_size for a random init)."""
    if not 1 <= num_hidden_layers:
        raise UserError(f"distill.student_layers={num_hidden_layers}: must be at least 1.")
    return teacher.replace(num_hidden_layers=num_hidden_layers, **changes)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (0-based) that student layer i stands for: i * L_t // L_s (DistilBERT's every k-th)."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def init_student(teacher: Bert, config: BertConfig, init: str, seed: int, head: str | None = None) -> Bert:
    """A student with `head` (default: the teacher's): "teacher-layers" copies embeddings, every k-th layer,
    and the pooler and heads both have from the teacher (DistilBERT); "random" is a fresh initialisation
    from `seed`."""
    student = type(teacher)(config, head or teacher.task, rngs=nnx.Rngs(seed))  # the teacher's family
    if init == "random":
        return student
    if init != "teacher-layers":
        raise UserError(f"distill.init={init!r}: use 'teacher-layers' or 'random'.")
    if config.hidden_size != teacher.config.hidden_size or config.num_hidden_layers > teacher.config.num_hidden_layers:
        raise UserError(f"distill.init=teacher-layers needs the teacher's width ({teacher.config.hidden_size}) and "
                         f"at most its {teacher.config.num_hidden_layers} layers; use distill.init=random.")
    source = nnx.state(teacher, nnx.Param)
    target = nnx.state(student, nnx.Param)
    for i, j in enumerate(layer_map(config.num_hidden_layers, teacher.config.num_hidden_layers)):
        target["layers"][i] = source["layers"][j]
    for name in source:  # embeddings, heads and whatever else a family has beside its layers
        if name not in ("layers", "last_layer") and name in target:
            target[name] = source[name]
    nnx.update(student, jax.tree.map(lambda x: jnp.array(x, copy=True), target))
    return student


def teacher_logits(logits: list[jax.Array], temperature: float) -> jax.Array:
    """The teachers' combined distribution at temperature T, as logits z with softmax(z / T) = the mean of
    the teachers' softmax(z_i / T): one teacher's logits as they are, several averaged in probability."""
    if len(logits) == 1:
        return logits[0]
    log_p = jnp.stack([jax.nn.log_softmax(z.astype(jnp.float32) / temperature, -1) for z in logits])
    return temperature * (jax.nn.logsumexp(log_p, axis=0) - jnp.log(len(logits)))


def make_train_step(student_graphdef: nnx.GraphDef, teacher_graphdefs: dict[str, nnx.GraphDef],
                    tx: optax.GradientTransformation, kd: Distillation, task,
                    teacher_tasks: dict[str, Any] | None = None) -> Callable:
    """`train_step(state, batch, key, aux) -> (state, metrics)` with aux = {"teachers": {name: params}};
    state.params is a `Student`'s. The teachers run in eval mode on the same (masked) inputs; their
    distributions are averaged. Metrics: loss, ce, kl, accuracy (student), agreement (student argmax ==
    teachers' argmax), and hidden_mse / attention_mse when weighted (one teacher only).

    `teacher_tasks`: a teacher scored by another task than the student's (a prompt run teaching a
    classifier, PET's last step) reads its own inputs from the batch; its targets must have the student's
    labels, in the same order.
    """
    teacher_tasks = teacher_tasks or {}
    want_inner = kd.hidden_weight > 0 or kd.attention_weight > 0
    if want_inner and (len(teacher_graphdefs) != 1 or teacher_tasks):
        raise UserError("distill.hidden_weight / distill.attention_weight need exactly one teacher of the "
                         "student's task.")

    def run(model, prepared, batch, deterministic, key, collect):
        out = task.forward(model, model.embed(prepared.input_ids), batch, prepared.extra,
                           deterministic=deterministic, dropout_key=key, collect=collect)
        return task.targets(out, batch, prepared.extra)

    def train_step(state: TrainState, batch: dict, key: jax.Array, aux) -> tuple[TrainState, Metrics]:
        prepared = task.prepare(batch, step_key(key, state.step))
        t_inner = {} if want_inner else None
        t_logits = []
        for name, graphdef in teacher_graphdefs.items():  # teachers frozen, eval mode
            teacher = nnx.merge(graphdef, jax.lax.stop_gradient(aux["teachers"][name]))
            if name in teacher_tasks:
                t_task = teacher_tasks[name]
                t_prepared = t_task.prepare(batch, None)
                out = t_task.forward(teacher, teacher.embed(t_prepared.input_ids), batch, t_prepared.extra)
                t_logits.append(jax.lax.stop_gradient(t_task.targets(out, batch, t_prepared.extra).logits))
            else:
                t_logits.append(jax.lax.stop_gradient(run(teacher, prepared, batch, True, None, t_inner).logits))
        t_logits = teacher_logits(t_logits, kd.temperature)

        def loss_fn(params):  # first argument is what is differentiated
            student = nnx.merge(student_graphdef, params)
            s_inner = {} if want_inner else None
            s = run(student.bert, prepared, batch, False, prepared.dropout_key, s_inner)
            total, ce, kl = losses.distillation(s.logits, t_logits, s.labels, kd.alpha, kd.temperature, s.where)
            t_sum, count = losses.masked_sum(total, s.where)
            loss = global_mean(t_sum, count)
            agree = (jnp.argmax(s.logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
            correct = (jnp.argmax(s.logits, -1) == s.labels).astype(jnp.float32)
            metrics = {"ce": losses.masked_sum(ce, s.where), "kl": losses.masked_sum(kl, s.where),
                       "accuracy": losses.masked_sum(correct, s.where), "agreement": losses.masked_sum(agree, s.where)}
            valid_bt = batch["attention_mask"][..., None] * (batch["weight"][:, None, None] > 0)
            local_tokens = jnp.sum(valid_bt, dtype=jnp.float32)
            pairs = layer_map(len(s_inner["attention"]), len(t_inner["attention"])) if want_inner else []
            if kd.hidden_weight > 0:  # student layer i+1 <-> teacher layer map(i)+1; embeddings <-> embeddings
                mse = _mse(student.projection(s_inner["hidden"][0]), t_inner["hidden"][0], valid_bt)
                for i, j in enumerate(pairs):
                    mse += _mse(student.projection(s_inner["hidden"][i + 1]), t_inner["hidden"][j + 1], valid_bt)
                mse = mse / (len(pairs) + 1)
                loss = loss + kd.hidden_weight * global_mean(mse, local_tokens)
                metrics["hidden_mse"] = (mse, local_tokens)
            if kd.attention_weight > 0:  # heads must match; rows of padded queries are not compared
                mse = sum(_mse(s_inner["attention"][i], t_inner["attention"][j],
                               batch["attention_mask"][:, None, :, None] * (batch["weight"][:, None, None, None] > 0))
                          for i, j in enumerate(pairs)) / len(pairs)
                loss = loss + kd.attention_weight * global_mean(mse, local_tokens)
                metrics["attention_mse"] = (mse, local_tokens)
            metrics["loss"] = (loss, global_mean(count, count))  # this device's share of the global loss
            return loss, metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, global_sum(grads), tx), global_sum(metrics)

    return train_step


def _mse(a, b, mask) -> jax.Array:
    """Sum over masked rows of the mean squared difference along the last axis (float32)."""
    diff = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)).mean(-1, keepdims=True)
    return jnp.sum(diff * mask)


def build(ctx: Context, kd: Distillation) -> Recipe:
    """The student starts from the (first) teacher: every k-th layer, or a random init of its shape."""
    kd.check()
    tasks = teacher_tasks(kd, ctx.tokenizer)
    teachers = {name: ctx.load(ref, tasks[name].head if name in tasks else None)
                for name, ref in zip(_names(kd), kd.teachers)}
    first = next(iter(teachers.values()))
    labels = {"num_labels": len(ctx.labels), "labels": tuple(ctx.labels)} if ctx.labels else {}
    if kd.student:  # its own family, size and weights; the batch's token ids must mean the same to both
        check_same_vocabulary(kd.student, kd.teachers[0], ctx.tokenizer)
        bert = ctx.load(kd.student)
    else:
        config = student_config(first.config, kd.student_layers, **labels)
        bert = init_student(first, config, kd.init, ctx.seed, ctx.task.head)
    student = Student(bert, first.config.hidden_size, kd.hidden_weight > 0, rngs=nnx.Rngs(ctx.seed + 1))
    graphdef, params = nnx.split(student)
    split = {name: nnx.split(model) for name, model in teachers.items()}
    return Recipe(task=ctx.task, tx=ctx.tx, graphdef=graphdef, params=params,
                  train_step=make_train_step(graphdef, {n: g for n, (g, _) in split.items()}, ctx.tx, kd, ctx.task,
                                             tasks),
                  eval_step=clean.make_eval_step(graphdef, ctx.task, select=lambda student: student.bert),
                  export=lambda p: nnx.merge(graphdef, p).bert,
                  aux={"teachers": {n: p for n, (_, p) in split.items()}})


def check_same_vocabulary(student: str, teacher: str, tokenizer: Any) -> None:
    """Refuse a student whose tokenizer maps text to other ids than the teacher's (the run's `tokenizer`)."""
    from jaxopt_llm.models.hub import load_tokenizer

    theirs = load_tokenizer(student)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"distill.student={student!r} has another vocabulary than the teacher {teacher!r} "
                        f"({len(theirs)} vs {len(tokenizer)} tokens): teacher and student read the same token ids, "
                        "so they need the same tokenizer. Pick a student with the teacher's tokenizer (e.g. "
                        "DistilBERT for BERT, DistilRoBERTa for RoBERTa), or leave distill.student unset to "
                        "make one from the teacher's layers.")


def _names(kd: Distillation) -> list[str]:
    return [f"teacher_{i}" for i in range(len(kd.teachers))]


def teacher_tasks(kd: Distillation, tokenizer) -> dict[str, Any]:
    """The teachers scored by their own task: prompt runs (their prompt.json), reading batch keys teacher_<i>_*."""
    from jaxopt_llm.runs import RunFolder
    from jaxopt_llm.steps import prompt

    out = {}
    for name, ref in zip(_names(kd), kd.teachers):
        run = RunFolder.of(ref)
        if run is not None and run.kind() == "prompt":
            out[name] = prompt.from_json(run.read("prompt.json"), tokenizer, prefix=name)
    return out


def _encoders(kd: Distillation, task, tokenizer) -> list:
    return [t.encode for t in teacher_tasks(kd, tokenizer).values()]


METHOD = Method("distill", Distillation, build, help="knowledge distillation from distill.teacher into a smaller "
                "student", base_model=lambda kd: (kd.teachers or [None])[0], encoders=_encoders)
