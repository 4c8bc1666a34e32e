"""Hugging Face checkpoints <-> our NNX parameters, for every family: the family's key table (its
`params.py`) says which HF tensor fills which parameter; this module does the reading, checking and writing.
Every shape is checked and every mismatch reported at once; heads a checkpoint lacks are initialised and named.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm.errors import UserError
from jaxopt_llm.models import registry
from jaxopt_llm.models.family import Family
from jaxopt_llm.models.hub import (
    TOKENIZER_FILES,
    CheckpointError,
    CheckpointWarning,
    read_config,
    read_weights,
    resolve,
)

_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> folder it was loaded from


@functools.lru_cache(maxsize=8)
def _fresh_init(family: Family, config: Any, task: str, names: tuple[str, ...]) -> Callable:
    """seed -> the freshly initialised tensors `names` of a model, as one compiled program (XLA drops the
    initialisers of every other tensor; eager, each initialiser op would compile on its own)."""
    def init(seed):
        flat = _flat(nnx.state(family.module(config, task, rngs=nnx.Rngs(jax.random.key(seed)))))  # = Rngs(seed)
        return {name: flat[name][...] for name in names}

    return jax.jit(init)


def _flat(state: nnx.State) -> dict[str, Any]:
    return {".".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(state)}


def _slot(family: Family, ours: str, part: str | None, width: int) -> tuple[str, Any]:
    if part is None:
        return ours, ...
    j = family.parts.index(part)
    return ours, (..., slice(j * width, (j + 1) * width))


def convert(family: Family, tensors: dict[str, np.ndarray], config: Any, task: str,
            template: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """HF tensors -> {our path: array} for the paths in `template` (path -> abstract array).

    Returns (params, missing our-paths, unused HF keys). Raises CheckpointError listing every shape mismatch.
    """
    width = config.hidden_size
    params = {path: np.zeros(leaf.shape, np.float32) for path, leaf in template.items()}
    filled: set[tuple[str, Any]] = set()
    unused, mismatches = [], []
    rules = family.rules(task, config)
    for key, tensor in tensors.items():
        name = family.normalise(key)
        hit = next(((rule, m) for rule in rules if (m := rule[0].match(name))), None)
        if hit is None:
            if name not in family.derived:
                unused.append(key)
            continue
        (_, ours, transpose), m = hit
        groups = m.groupdict()
        path = ours.replace("{i}", groups.get("i") or "")
        if path not in params:
            unused.append(key)
            continue
        value = tensor.T if transpose else tensor
        slot = _slot(family, path, groups.get("part"), width)
        target = params[path][slot[1]]
        if value.shape != target.shape:
            expect = target.shape[::-1] if transpose else target.shape
            mismatches.append(f"  {key}: checkpoint {tuple(tensor.shape)}, model expects {tuple(expect)}")
            continue
        params[path][slot[1]] = value
        filled.add((path, str(slot[1])))
    if mismatches:
        raise CheckpointError(
            f"{len(mismatches)} tensor(s) do not fit the model config (vocab_size={config.vocab_size}, "
            f"hidden_size={config.hidden_size}, num_labels={config.num_labels}, ...):\n" + "\n".join(mismatches)
            + "\nUse the config.json that belongs to these weights, or pass the num_labels the head was trained with.")
    missing = []
    fused = [re.compile(ours.replace(".", r"\.").replace("{i}", r"\d+")) for hf, ours, _ in family.rows(task, config)
             if "{part}" in hf]  # parameters filled in thirds (a fused qkv)
    for path, leaf in template.items():
        parts = family.parts if any(p.fullmatch(path) for p in fused) else (None,)
        if any((path, str(_slot(family, path, p, width)[1])) not in filled for p in parts):
            missing.append(path)
    return params, missing, unused


@functools.lru_cache(maxsize=16)
def _abstract(family: Family, config: Any, task: str) -> tuple[Any, Any]:
    """(graphdef, state of shapes) of `family.module(config, task)`. Cached: tracing the constructor takes
    seconds, and neither part depends on the seed or is changed by its users."""
    return nnx.split(nnx.eval_shape(lambda: family.module(config, task, rngs=nnx.Rngs(0))))


def from_pretrained(name_or_path: str | os.PathLike, task: str = "base", *, num_labels: int | None = None,
                    dtype: str = "float32", param_dtype: str = "float32", seed: int = 0,
                    required: tuple[str, ...] = (), **config_changes: Any) -> Any:
    """Load a Hugging Face checkpoint (local folder, run folder or hub id) of any registered family (by its
    config.json's model_type) as our module for `task`.

    task: "base" | "masked-lm" | "pretraining" | "sequence-classification". Heads absent from the checkpoint
    are initialised from `seed` and named in one `CheckpointWarning`; unused tensors are named in another.
    Raises `CheckpointError` for a missing folder or file, an encoder tensor missing, or shape mismatches.
    `config_changes` override config fields of the checkpoint's config (dropout rates, labels).
    `required`: heads ("classifier", "mlm", ...) that must come from the checkpoint, not a fresh init.
    """
    folder = resolve(name_or_path)
    hf = read_config(folder)
    family = registry.of_config(hf, str(folder))
    if task not in family.architectures:
        raise CheckpointError(f"task={task!r}: a {family.model_type} model has the tasks "
                              f"{sorted(family.architectures)}.")
    changes = {"dtype": dtype, "param_dtype": param_dtype, **config_changes}
    if num_labels is not None:
        changes["num_labels"] = num_labels
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(family.config)})
    if unknown:
        raise UserError(f"{', '.join(unknown)}: not a setting of a {family.model_type} model (its config is "
                        f"{family.config.__name__}); drop it for this model.")
    config = family.config.from_hf_config(hf, **changes)
    tensors = read_weights(folder)

    unrolled = config.replace(scan_layers=False, remat="none", scan_unroll=False)  # checkpoints name layers one by one
    state = _abstract(family, unrolled, task)[1]
    graphdef = _abstract(family, config, task)[0]
    params, missing, unused = convert(family, tensors, config, task, _flat(state))
    encoder_missing = [p for p in missing if p.split(".")[0] not in family.heads]
    if encoder_missing:
        raise CheckpointError(f"{str(folder)!r} lacks {len(encoder_missing)} encoder tensor(s) the config "
                              f"needs, e.g. {encoder_missing[:5]}: the weights do not match config.json "
                              f"(num_hidden_layers={config.num_hidden_layers}).")
    untrained = sorted({p.split(".")[0] for p in missing} & set(required))
    if untrained:
        raise CheckpointError(f"{str(name_or_path)!r} has no trained {', '.join(untrained)} head weights: a freshly "
                              "initialised head predicts noise. Train one first (jaxopt-llm finetune / pretrain), "
                              "or allow it explicitly (--allow-untrained-head).")
    fresh = {}
    if missing:
        warnings.warn(f"{str(name_or_path)!r} has no weights for {sorted(missing)}; they are freshly "
                      f"initialised (seed={seed}). Train them before use.", CheckpointWarning, stacklevel=2)
        fresh = _fresh_init(family, unrolled, task, tuple(sorted(missing)))(seed)
    if unused:
        warnings.warn(f"{len(unused)} tensor(s) in {str(name_or_path)!r} are not used by task={task!r}: "
                      f"{sorted(unused)}", CheckpointWarning, stacklevel=2)
    leaves = {path: (fresh[path] if path in missing else jnp.asarray(params[path], dtype=param_dtype))
              for path in params}
    if config.scan_layers:
        leaves = stack_layers(leaves, config.num_hidden_layers)
    state = nnx.from_flat_state({tuple(_key(p) for p in path.split(".")): v for path, v in leaves.items()})
    model = nnx.merge(graphdef, state)
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        _SOURCES[model] = folder  # save_pretrained(model, out) writes this tokenizer along
    return model


def stack_layers(flat: dict[str, Any], n: int) -> dict[str, Any]:
    """{"layers.<i>.rest": a} -> {"layers.rest": stack over i < n-1, "last_layer.rest": layer n-1}: the scanned
    encoder's layout."""
    out = {k: v for k, v in flat.items() if not k.startswith("layers.")}
    rests = sorted({k.split(".", 2)[2] for k in flat if k.startswith("layers.")})
    for rest in rests:
        if n > 1:
            out[f"layers.{rest}"] = jnp.stack([jnp.asarray(flat[f"layers.{i}.{rest}"]) for i in range(n - 1)])
        out[f"last_layer.{rest}"] = flat[f"layers.{n - 1}.{rest}"]
    return out


def unstack_layers(flat: dict[str, Any], n: int) -> dict[str, Any]:
    """The inverse of stack_layers."""
    out = {k: v for k, v in flat.items() if not k.startswith(("layers.", "last_layer."))}
    for k, v in flat.items():
        if k.startswith("layers."):
            for i in range(n - 1):
                out[f"layers.{i}.{k[len('layers.'):]}"] = np.asarray(v[...])[i]
        elif k.startswith("last_layer."):
            out[f"layers.{n - 1}.{k[len('last_layer.'):]}"] = np.asarray(v[...])
    return out


def _key(part: str) -> str | int:
    return int(part) if part.isdigit() else part


def hf_slots(model: Any, paths: Any) -> list[tuple[str, str, Any, bool]]:
    """(Hugging Face key, our parameter path, the slot of it the key holds -- `...` or a column slice of a fused
    kernel --, transposed) of every key the class for `model.task` has, among our `paths`."""
    config, task = model.config, model.task
    family = registry.of_model(model)
    out = []
    for hf, ours, transpose in family.rows(task, config):
        for i in range(config.num_hidden_layers) if "{i}" in hf else [None]:
            for part in family.parts if "{part}" in hf else [None]:
                path = ours.replace("{i}", str(i))
                if path not in paths:
                    continue
                key = hf.replace("{i}", str(i)).replace("{part}", part or "")
                if task != "base" and not key.startswith(family.head_keys):
                    key = family.prefix + key
                out.append((key, path, _slot(family, path, part, config.hidden_size)[1], transpose))
    return out


def to_hf_tensors(model: Any) -> dict[str, np.ndarray]:
    """Our parameters under Hugging Face key names, as the class for `model.task` expects them."""
    flat = _flat(nnx.state(model, nnx.Param))
    if model.config.scan_layers:
        flat = unstack_layers(flat, model.config.num_hidden_layers)
    out = {}
    for key, path, slot, transpose in hf_slots(model, flat):
        value = np.asarray(flat[path][...])[slot]
        out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out


def save_pretrained(model: Any, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write config.json + model.safetensors + the tokenizer's files, loadable by transformers.

    The tokenizer is `tokenizer`, else the one of the folder the model was loaded from. The folder is
    replaced as a whole: everything is written to a sibling temporary folder, synced, then renamed into
    place, so a crash leaves the old folder or the new one, never a mixture.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"{str(out)!r} exists and is not a model folder (no config.json); save_pretrained "
                              "replaces its folder as a whole: pass a new or empty folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.astype(np.float32) if v.dtype not in (np.float32, np.float16) else v
               for k, v in to_hf_tensors(model).items()}
    hf_config = model.config.to_hf_config(architectures=(registry.of_model(model).architectures[model.task],))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(hf_config.to_json_string(use_diff=False))
        source = _SOURCES.get(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copyfile(source / name, tmp / name)
        for file in tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
