"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for any registered family, in weight space.

A target is a Hugging Face linear layer, named as `peft` names it (`...attention.self.query`); its adapter is
a (in, r) and b (r, out), and the layer's weight becomes W + (alpha / r) (a b)^T. Targets are found through the
family's key table (`models.convert.hf_slots`), so a fused kernel (BERT's query | key | value) takes the delta
in its third's columns and no module changes. `materialize(trainable, frozen)` writes the adapted parameters
from the trainable ones (adapters and the modules trained whole) and the frozen rest; the frozen part never
enters the optimizer or a checkpoint. On disk the adapters are `peft`'s format: adapter_model.safetensors
(lora_A (r, in), lora_B (out, r), modules_to_save whole) and adapter_config.json.

Dropout on the adapter's input (`peft`'s lora_dropout) would need the layer's input, which the weight-space
form never sees; only 0 (`peft`'s default) is taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_llm.errors import UserError

PEFT_TASKS = {"classification": "SEQ_CLS", "token-classification": "TOKEN_CLS", "question-answering": "QUESTION_ANS"}
# peft's default target_modules per model_type (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {"bert": ("query", "value"), "roberta": ("query", "value"), "xlm-roberta": ("query", "value"),
                   "electra": ("query", "value"), "distilbert": ("q_lin", "v_lin"),
                   "deberta-v2": ("query_proj", "value_proj"), "modernbert": ("Wqkv",)}


@dataclasses.dataclass(frozen=True)
class Target:
    module: str  # the Hugging Face module, e.g. "bert.encoder.layer.0.attention.self.query"
    path: str  # our parameter (a kernel (in, out)) in the flat params
    slot: Any  # the part of it the module's weight is: `...` or a column slice of a fused kernel
    shape: tuple[int, int]  # (in, out) of the delta


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a LoRA run trains: `targets` (adapters) and `trained` (flat paths trained whole); `keys` and
    `treedef` rebuild the params tree from flat leaves."""

    targets: tuple[Target, ...]
    trained: tuple[str, ...]
    modules_to_save: tuple[str, ...]  # the Hugging Face modules behind `trained`
    keys: tuple[str, ...]
    treedef: Any
    rank: int
    alpha: float
    names: tuple[str, ...]  # the target_modules the targets were found by

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _flat(tree) -> tuple[dict[str, Any], tuple[str, ...], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = tuple(".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in leaves)
    return dict(zip(keys, (leaf for _, leaf in leaves))), keys, treedef


def _matches(module: str, patterns: tuple[str, ...]) -> bool:
    """peft's rule for a list of target_modules: the name, or its last dotted parts."""
    return any(module == p or module.endswith("." + p) for p in patterns)


def plan(model, params: Any, targets: tuple[str, ...], train: tuple[str, ...], rank: int, alpha: float,
         task: str) -> Plan:
    """The adapters of `model` (the exported encoder of `params`, a pure-dict params tree that holds its
    parameters under one prefix, with any others of the method's own) for the module names `targets` (default:
    peft's for the family), and the Hugging Face modules `train` trained whole (default: the task's head, the
    keys outside the base model's prefix; none for masked LM); every other leaf is frozen."""
    from flax import nnx

    from jaxopt_llm.models import registry
    from jaxopt_llm.models.convert import hf_slots

    family = registry.of_model(model)
    targets = targets or DEFAULT_TARGETS.get(family.model_type, ("query", "value"))

    flat, keys, treedef = _flat(params)
    model_flat, _, _ = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    first = next(iter(model_flat))
    candidates = sorted({k[:len(k) - len(first)] for k in keys if k.endswith(first)}, key=len)
    prefix = next((c for c in candidates if all(c + m in flat for m in model_flat)), None)
    if prefix is None:
        raise UserError("lora: the method's parameters do not hold its exported model's; it cannot train adapters.")
    slots = hf_slots(model, model_flat)
    found = []
    for key, path, slot, transpose in slots:
        module = key.rsplit(".", 1)[0]
        if transpose and key.endswith(".weight") and _matches(module, targets):
            shape = np.shape(np.asarray(model_flat[path])[slot])
            found.append(Target(module, prefix + path, slot, (int(shape[0]), int(shape[1]))))
    if not found:
        names = sorted({k.rsplit(".", 1)[0] for k, _, _, t in slots if t and k.endswith(".weight")})
        raise UserError(f"lora.targets={','.join(targets)!r} names none of the model's linear layers; they are "
                        f"named as peft names them, e.g. {', '.join(n.rsplit('.', 1)[-1] for n in names[:1])}: "
                        f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}.")
    if train:
        trained_model = {path for key, path, _, _ in slots if _matches(key.rsplit(".", 1)[0], train)}
    else:
        trained_model = {path for key, path, _, _ in slots if task != "masked-lm" and not key.startswith(family.prefix)}
    modules = sorted({key.rsplit(".", 1)[0] for key, path, _, _ in slots if path in trained_model})
    if train and not trained_model:
        raise UserError(f"lora.train={','.join(train)!r} names no module of the model; give Hugging Face module "
                        "names (e.g. classifier) or leave it empty for peft's head of the task.")
    own = {k for k in keys if not k.startswith(prefix) or k[len(prefix):] not in model_flat}  # the method's own
    trained = tuple(k for k in keys if k in own or (k.startswith(prefix) and k[len(prefix):] in trained_model))
    return Plan(tuple(found), trained, tuple(modules), keys, treedef, rank, alpha, targets)


def split(p: Plan, params: Any, key: jax.Array) -> tuple[dict, dict]:
    """(trainable, frozen): the adapters (a uniform in +-1 / sqrt(in), as peft's kaiming init; b zeros, so the
    model starts as it is) and the modules trained whole, then every other leaf."""
    flat, _, _ = _flat(params)
    keys = jax.random.split(key, len(p.targets))
    adapters = {}
    for t, k in zip(p.targets, keys):
        bound = 1.0 / math.sqrt(t.shape[0])
        adapters[t.module] = {"a": jax.random.uniform(k, (t.shape[0], p.rank), jnp.float32, -bound, bound),
                              "b": jnp.zeros((p.rank, t.shape[1]), jnp.float32)}
    trainable = {"adapters": adapters, "whole": {k: flat[k] for k in p.trained}}
    frozen = {k: v for k, v in flat.items() if k not in p.trained}
    return trainable, frozen


def materialize(p: Plan, trainable: dict, frozen: dict) -> Any:
    """The params tree with every adapter added to its weight and the trained modules in place."""
    flat = {**frozen, **trainable["whole"]}
    for t in p.targets:
        ab = trainable["adapters"][t.module]
        delta = (ab["a"] @ ab["b"]) * p.scale
        flat[t.path] = jnp.asarray(flat[t.path]).at[t.slot].add(delta.astype(flat[t.path].dtype))
    return jax.tree_util.tree_unflatten(p.treedef, [flat[k] for k in p.keys])


def count(tree) -> int:
    """The number of values in a pytree's leaves."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def write_peft(p: Plan, trainable: dict, merged_model, out: str | Path, task: str, base: str) -> Path:
    """adapter_model.safetensors + adapter_config.json in `out`, as `peft` writes them for this model class."""
    from safetensors.numpy import save_file

    from jaxopt_llm.models.convert import to_hf_tensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for t in p.targets:
        ab = jax.device_get(trainable["adapters"][t.module])
        tensors[f"base_model.model.{t.module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"]).T)
        tensors[f"base_model.model.{t.module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"]).T)
    for key, value in to_hf_tensors(merged_model).items():
        if key.rsplit(".", 1)[0] in p.modules_to_save:
            tensors[f"base_model.model.{key}"] = value
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": PEFT_TASKS.get(task), "r": p.rank, "lora_alpha": p.alpha,
              "lora_dropout": 0.0, "target_modules": list(p.names), "modules_to_save": list(p.modules_to_save) or None,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
              "use_rslora": False,
              "base_model_name_or_path": base}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def adapter_ensemble(model) -> tuple[dict, Any] | None:
    """An `inference.Inference` of an adapter-ensemble run (lora.members > 1) as (weights, expand): weights
    {"frozen": the base once, "members": each member's adapters and head, stacked}, expand(weights) -> the
    members' stacked parameters. None for any other model. The base is member 0's merged parameters less its
    adapters' delta (float32 rounding of the merge, ~1e-7 relative)."""
    from flax import nnx
    from safetensors.numpy import load_file

    from jaxopt_llm.runs import RunFolder

    run = RunFolder.of(model.reference) if not model.artifact else None
    info = run.read("lora.json") if run is not None else None
    if not info or info.get("members", 1) < 2:
        return None
    engine = model.engine
    stacked = nnx.to_pure_dict(engine.state) if isinstance(engine.state, nnx.State) else engine.state
    n = len(jax.tree.leaves(stacked)[0])
    members = [jax.tree.map(lambda x: np.asarray(x[i]), stacked) for i in range(n)]
    first = nnx.merge(engine.graphdef, members[0])
    p = plan(first, members[0], tuple(info["targets"]), tuple(info.get("train", ())), info["rank"], info["alpha"],
             run.task() or "classification")
    trainables = []
    for i, params in enumerate(members):
        tensors = load_file(run.path / "adapters" / str(i) / "adapter_model.safetensors")
        flat, _, _ = _flat(params)

        def read(module, x):  # peft's lora_A (r, in) / lora_B (out, r) -> our a (in, r) / b (r, out)
            return np.ascontiguousarray(tensors[f"base_model.model.{module}.lora_{x}.weight"].T)

        trainables.append({
            "adapters": {t.module: {"a": read(t.module, "A"), "b": read(t.module, "B")} for t in p.targets},
            "whole": {k: flat[k] for k in p.trained}})
    flat, _, _ = _flat(members[0])
    frozen = {k: np.array(v) for k, v in flat.items() if k not in p.trained}
    for t in p.targets:  # member 0's delta out: the base
        ab = trainables[0]["adapters"][t.module]
        frozen[t.path][t.slot] -= (ab["a"] @ ab["b"]) * p.scale
    weights = {"frozen": frozen, "members": jax.tree.map(lambda *xs: np.stack(xs), *trainables)}

    def expand(w):
        return jax.vmap(lambda t: materialize(p, t, w["frozen"]))(w["members"])

    return weights, expand
