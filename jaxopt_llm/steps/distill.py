"""Knowledge distillation: a student learns from a teacher's softened predictions (and, optionally, its
hidden states and attention maps, TinyBERT-style) in one jitted step.

`train_step(state, teacher_params, batch, key) -> (state, metrics)`: the teacher's parameters are an
argument (never closed over, so they are not baked into the program, and never checkpointed with the
student), run in eval mode and wrapped in stop_gradient. Teacher and student may differ in depth and
width (same vocabulary); widths are bridged by a learned projection of the student's hidden states.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_llm import losses
from jaxopt_llm.bert.modeling import Bert, BertConfig
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps import classify, mlm
from jaxopt_llm.steps.common import Metrics, apply_gradients, global_count, psum, step_key


@dataclasses.dataclass(frozen=True)
class Distillation:
    alpha: float = 0.5  # weight of the soft (teacher) term; 0 is plain training on labels
    temperature: float = 2.0
    hidden_weight: float = 0.0  # MSE between (projected) student and teacher hidden states
    attention_weight: float = 0.0  # MSE between attention probabilities

    @classmethod
    def from_config(cls, cfg) -> Distillation:
        """From a `DistillConfig` (same field names for the loss weights)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha={self.alpha}: must be in [0, 1].")
        if self.temperature <= 0:
            raise ValueError(f"distill.temperature={self.temperature}: must be positive.")


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
        raise ValueError(f"distill.student_layers={num_hidden_layers}: must be at least 1.")
    return teacher.replace(num_hidden_layers=num_hidden_layers, **changes)


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (0-based) that student layer i stands for: i * L_t // L_s (DistilBERT's every k-th)."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def init_student(teacher: Bert, config: BertConfig, init: str, seed: int) -> Bert:
    """A student for the teacher's task: "teacher-layers" copies embeddings, every k-th layer, pooler and
    heads from the teacher (DistilBERT); "random" is a fresh initialisation from `seed`."""
    student = Bert(config, teacher.task, rngs=nnx.Rngs(seed))
    if init == "random":
        return student
    if init != "teacher-layers":
        raise ValueError(f"distill.init={init!r}: use 'teacher-layers' or 'random'.")
    if config.hidden_size != teacher.config.hidden_size or config.num_hidden_layers > teacher.config.num_hidden_layers:
        raise ValueError(f"distill.init=teacher-layers needs the teacher's width ({teacher.config.hidden_size}) and "
                         f"at most its {teacher.config.num_hidden_layers} layers; use distill.init=random.")
    source = nnx.state(teacher, nnx.Param)
    target = nnx.state(student, nnx.Param)
    for i, j in enumerate(layer_map(config.num_hidden_layers, teacher.config.num_hidden_layers)):
        target["layers"][i] = source["layers"][j]
    for name in ("embeddings", "pooler", "mlm", "nsp", "classifier"):
        if name in source and name in target:
            target[name] = source[name]
    nnx.update(student, jax.tree.map(lambda x: jnp.array(x, copy=True), target))
    return student


def make_train_step(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, kd: Distillation, masking: mlm.Masking | None = None,
                    axis_name: str | None = None) -> Callable:
    """`train_step(state, teacher_params, batch, key) -> (state, metrics)`; state.params is a `Student`'s.

    Classification when `masking` is None, else masked LM (the teacher's MLM distribution at the masked
    positions). Metrics: loss, ce, kl, accuracy (student), agreement (student argmax == teacher argmax),
    and hidden_mse / attention_mse when weighted.
    """
    want_inner = kd.hidden_weight > 0 or kd.attention_weight > 0

    def run(model: Bert, ids, batch, extra, deterministic, key, collect):
        emb = model.embed(ids)
        if masking is None:
            k_encode, k_head = (None, None) if key is None else jax.random.split(key)
            positions = None if collect is not None else jnp.zeros((ids.shape[0], 1), jnp.int32)
            hidden = model.encode(emb, batch["attention_mask"], batch["token_type_ids"], deterministic=deterministic,
                                  dropout_key=k_encode, output_positions_bp=positions, collect=collect)
            return model.classify_logits(hidden, deterministic=deterministic, dropout_key=k_head)
        positions = extra[0]
        if collect is None:
            return mlm.logits_from_embeddings(model, emb, batch, positions, deterministic=deterministic,
                                              dropout_key=key)[0]
        hidden = model.encode(emb, batch["attention_mask"], batch["token_type_ids"], deterministic=deterministic,
                              dropout_key=key, collect=collect)
        return model.mlm_logits(jnp.take_along_axis(hidden, positions[..., None], axis=1))

    def train_step(state: TrainState, teacher_params, batch: dict, key: jax.Array) -> tuple[TrainState, Metrics]:
        sk = step_key(key, state.step)
        if masking is None:
            ids, extra, labels, where, dropout_key = batch["input_ids"], None, batch["labels"], batch["weight"] > 0, sk
        else:
            mask_key, dropout_key = jax.random.split(sk)
            ids, positions, labels, weights = mlm.mask_batch(mask_key, batch, masking)
            extra, where = (positions,), (weights > 0) & (batch["weight"][:, None] > 0)
        teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))  # teacher frozen, eval mode
        t_inner = {} if want_inner else None
        t_logits = jax.lax.stop_gradient(run(teacher, ids, batch, extra, True, None, t_inner))

        def loss_fn(params):  # first argument is what is differentiated
            student = nnx.merge(student_graphdef, params)
            s_inner = {} if want_inner else None
            s_logits = run(student.bert, ids, batch, extra, False, dropout_key, s_inner)
            total, ce, kl = losses.distillation(s_logits, t_logits, labels, kd.alpha, kd.temperature, where)
            t_sum, count = losses.masked_sum(total, where)
            n = global_count(count, axis_name)
            loss = t_sum / n
            agree = (jnp.argmax(s_logits, -1) == jnp.argmax(t_logits, -1)).astype(jnp.float32)
            correct = (jnp.argmax(s_logits, -1) == labels).astype(jnp.float32)
            metrics = {"ce": losses.masked_sum(ce, where), "kl": losses.masked_sum(kl, where),
                       "accuracy": losses.masked_sum(correct, where), "agreement": losses.masked_sum(agree, where)}
            valid_bt = batch["attention_mask"][..., None] * (batch["weight"][:, None, None] > 0)
            tokens = global_count(jnp.sum(valid_bt, dtype=jnp.float32), axis_name)
            local_tokens = jnp.sum(valid_bt, dtype=jnp.float32)
            pairs = layer_map(len(s_inner["attention"]), len(t_inner["attention"])) if want_inner else []
            if kd.hidden_weight > 0:  # student layer i+1 <-> teacher layer map(i)+1; embeddings <-> embeddings
                mse = _mse(student.projection(s_inner["hidden"][0]), t_inner["hidden"][0], valid_bt)
                for i, j in enumerate(pairs):
                    mse += _mse(student.projection(s_inner["hidden"][i + 1]), t_inner["hidden"][j + 1], valid_bt)
                mse = mse / (len(pairs) + 1)
                loss = loss + kd.hidden_weight * mse / tokens
                metrics["hidden_mse"] = (mse, local_tokens)
            if kd.attention_weight > 0:  # heads must match; rows of padded queries are not compared
                mse = sum(_mse(s_inner["attention"][i], t_inner["attention"][j],
                               batch["attention_mask"][:, None, :, None] * (batch["weight"][:, None, None, None] > 0))
                          for i, j in enumerate(pairs)) / len(pairs)
                loss = loss + kd.attention_weight * mse / tokens
                metrics["attention_mse"] = (mse, local_tokens)
            metrics["loss"] = (loss, count / n)  # this device's share of the global loss
            return loss, metrics

        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
        return apply_gradients(state, psum(grads, axis_name), tx), psum(metrics, axis_name)

    return train_step


def _mse(a, b, mask) -> jax.Array:
    """Sum over masked rows of the mean squared difference along the last axis (float32)."""
    diff = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)).mean(-1, keepdims=True)
    return jnp.sum(diff * mask)


def make_eval_step(student_graphdef: nnx.GraphDef, masking: mlm.Masking | None = None, seed: int = 0,
                   axis_name: str | None = None) -> Callable:
    """The student BERT's clean eval step (classification or MLM) on a `Student`'s params."""
    def eval_step(params, batch):
        student = nnx.merge(student_graphdef, params)
        graphdef, bert_params = nnx.split(student.bert)
        if masking is None:
            return classify.make_eval_step(graphdef, axis_name)(bert_params, batch)
        return mlm.make_eval_step(graphdef, masking, seed, axis_name)(bert_params, batch)

    return eval_step
