"""The lora method: low-rank adapters (`jaxopt_llm.lora`) trained by another method -- clean, adversarial or
distill (the student's adapters) -- on a frozen base.

The state holds the adapters and the modules trained whole, and the optimizer sees only them; the frozen base
rides in `aux` (never checkpointed, never donated, never copied by a step). One step: the adapted parameters
are written from the trainable ones (`lora.materialize`), the inner method's own step runs on them with an
optimizer that hands back its gradient instead of applying it, and the gradient is pulled back to the
trainable parameters (`jax.vjp` of the materialization), where the run's optimizer applies it. Gradients of
frozen weights have no consumer, so XLA does not compute them. The run folder's model/ is the merged model
(every later step takes it as any other); adapter/ holds the adapters in peft's format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx

from jaxopt_llm import lora
from jaxopt_llm.errors import UserError
from jaxopt_llm.recipes import Context, Method, Recipe
from jaxopt_llm.state import TrainState
from jaxopt_llm.steps import ensemble
from jaxopt_llm.steps.common import apply_gradients

INNER = ("clean", "adversarial", "distill")


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    """Config keys `lora.*`."""

    rank: int = 8  # r
    alpha: float = 16.0  # the adapter's delta is scaled by alpha / r
    dropout: float = 0.0  # peft's lora_dropout: only 0 (see jaxopt_llm.lora)
    targets: str = ""  # linear layers by Hugging Face module name (peft's target_modules); "" = peft's default
    train: str = ""  # modules trained whole, by Hugging Face name; "" = the task's head (none for masked LM)
    method: str = "clean"  # what trains the adapters: clean | adversarial | distill
    inner: Any = None  # that method's options (its dataclass, set in a config file); None: its defaults
    members: int = 1  # > 1: an adapter ensemble, N adapter sets (and heads) over one base in one vmapped step

    def __post_init__(self):
        if self.rank < 1:
            raise UserError(f"lora.rank={self.rank}: must be at least 1 (8 or 16 are usual).")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha={self.alpha}: must be positive (the delta is scaled by alpha / rank).")
        if self.dropout != 0.0:
            raise UserError(f"lora.dropout={self.dropout}: adapters here live in weight space, where dropout on "
                            "the adapter's input cannot be applied; use 0 (peft's default).")
        if self.method not in INNER:
            raise UserError(f"lora.method={self.method!r}: adapters train under {', '.join(INNER)}.")
        if self.members < 1 or (self.members > 1 and self.method == "distill"):
            raise UserError(f"lora.members={self.members}: at least 1; an adapter ensemble (more than 1) trains "
                            "under clean or adversarial, not distill.")

    @staticmethod
    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())


def _stash() -> optax.GradientTransformation:
    """An optimizer whose state after an update is the gradient it was given, and whose update is zero."""
    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        lambda grads, state, params=None: (jax.tree.map(jax.numpy.zeros_like, grads),
                                                                           grads))


def _inner(options: LoraOptions):
    """(the method that trains the adapters, its options)."""
    from jaxopt_llm import recipes

    method = recipes.get(options.method)
    return method, options.inner if options.inner is not None else method.options()


def build(ctx: Context, options: LoraOptions) -> Recipe:
    method, inner_options = _inner(options)
    if not isinstance(inner_options, method.options):
        raise UserError(f"lora.inner is a {type(inner_options).__name__}, but lora.method={options.method!r} "
                        f"takes {method.options.__name__}.")
    base = ctx.model  # the checkpoint the adapters are for
    if options.method == "distill":
        if not inner_options.student:
            raise UserError("lora.method=distill trains the adapters of a student checkpoint: set distill.student "
                            "(e.g. a smaller model of the teacher's vocabulary); a student made from the teacher's "
                            "layers has no checkpoint of its own for the adapters to apply to.")
        base = inner_options.student
    inner = method.build(dataclasses.replace(ctx, tx=_stash()), inner_options)
    params = nnx.to_pure_dict(inner.params) if isinstance(inner.params, nnx.State) else inner.params
    model = inner.export(params)
    task_name = getattr(ctx.task, "name", "")
    p = lora.plan(model, params, options.names(options.targets), options.names(options.train), options.rank,
                  options.alpha, task_name)
    n = options.members
    seeds = [ensemble.member_seed(ctx.seed, i) for i in range(n)]  # member 0's is the single run's
    # each member its own adapters and its own fresh head (from its seed), as the ensemble method's members
    adapters = [lora.split(p, params if i == 0 else nnx.to_pure_dict(nnx.state(ctx.load(ctx.model, seed=s))),
                           jax.random.fold_in(jax.random.key(s), 0x10A)) for i, s in enumerate(seeds)]
    frozen = adapters[0][1]
    trainable = adapters[0][0] if n == 1 else jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[a for a, _ in adapters])

    def grads_of(trainable, batch, key, step, aux):
        """The inner step's gradient (summed over devices already) pulled back to `trainable`, and metrics."""
        full, pullback = jax.vjp(lambda t: lora.materialize(p, t, aux["frozen"]), trainable)
        stepped, metrics = inner.train_step(TrainState(step, full, optax.EmptyState()), batch, key, aux["inner"])
        return pullback(stepped.opt_state)[0], metrics

    tx = ctx.tx if n == 1 else ensemble.vmapped(ctx.tx)
    per_pass = ensemble.EnsembleOptions(members=n).per_pass()  # members vmapped together (the ensemble's rule)

    def train_step(state: TrainState, batch: dict, key: jax.Array, aux=None):
        if n == 1:
            grads, metrics = grads_of(state.params, batch, key, state.step, aux)
        else:  # member i: its adapters, its batch, the key fold_in(key, i); the base is shared, not mapped
            keys = jax.vmap(lambda i: ensemble.member_key(key, i))(jax.numpy.arange(n))
            grads, metrics = ensemble.over_members(lambda t, b, k: grads_of(t, b, k, state.step, aux),
                                                   (state.params, batch, keys), per_pass)
        return apply_gradients(state, grads, tx), metrics

    ensemble_eval = ensemble.make_eval_step(inner.graphdef, ctx.task, per_pass=per_pass) if n > 1 else None

    def eval_step(trainable, batch: dict, aux=None):
        if n == 1:
            return inner.eval_step(lora.materialize(p, trainable, aux["frozen"]), batch, aux["inner"])
        return ensemble_eval(jax.vmap(lambda t: lora.materialize(p, t, aux["frozen"]))(trainable), batch)

    def member(trainable, i):
        return trainable if n == 1 else jax.tree.map(lambda x: x[i], trainable)

    def export(trainable):
        models = [inner.export(lora.materialize(p, member(trainable, i), frozen)) for i in range(n)]
        return models[0] if n == 1 else models

    def write(trainable, run, exported) -> None:  # exported: what `export` gave for these params
        for i, merged in enumerate(exported if n > 1 else [exported]):
            folder = run.path / "adapter" if n == 1 else run.path / "adapters" / str(i)
            lora.write_peft(p, member(trainable, i), merged, folder, task_name, str(base))

    files = {"lora.json": {"method": options.method, "rank": options.rank, "alpha": options.alpha,
                           "targets": list(p.names), "train": list(options.names(options.train)),
                           "modules_to_save": list(p.modules_to_save), "members": n, "base": str(base),
                           "adapted_layers": len(p.targets), "trainable_parameters": lora.count(trainable),
                           "frozen_parameters": lora.count(frozen)}}
    task, batches = inner.task, inner.batches
    if n > 1:
        task = ensemble.EnsembleTask(ctx.task, n)

        def batches(arrays, batch_size, seed, **process):
            return ensemble.MemberBatches(arrays, batch_size, seed, n, False, **process)

    return Recipe(task=task, tx=tx, graphdef=inner.graphdef, params=trainable, train_step=train_step,
                  eval_step=eval_step, export=export, aux={"frozen": frozen, "inner": inner.aux},
                  files={**inner.files, **files}, batches=batches, write=write, members=n if n > 1 else None)


def _base_model(options: LoraOptions):
    method, inner = _inner(options)
    return method.base_model(inner)


def _encoders(options: LoraOptions, task, tokenizer):
    method, inner = _inner(options)
    return method.encoders(inner, task, tokenizer)


METHOD = Method("lora", LoraOptions, build, help="train low-rank adapters (and the task's head) on a frozen model",
                base_model=_base_model, encoders=_encoders)
