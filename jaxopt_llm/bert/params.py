"""Hugging Face BERT checkpoints <-> our NNX parameters, both directions.

Every Hugging Face key name lives in `_TABLE` below and nowhere else in the package.
"""

from __future__ import annotations

import functools
import json
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

from jaxopt_llm.bert.modeling import TASKS, Bert, BertConfig
from jaxopt_llm.errors import UserError


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model; the message says what to change."""


class CheckpointWarning(UserWarning):
    """Keys were missing (freshly initialised heads) or unused when loading a checkpoint."""


# (HF key without the "bert." prefix, our parameter path, transpose). {i}: layer; {part}: one third of qkv.
_TABLE = [
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", False),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", False),
    ("encoder.layer.{i}.attention.self.{part}.weight", "layers.{i}.attention.qkv.kernel", True),
    ("encoder.layer.{i}.attention.self.{part}.bias", "layers.{i}.attention.qkv.bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers.{i}.attention.out.kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers.{i}.attention.out.bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers.{i}.attention_norm.scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers.{i}.attention_norm.bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers.{i}.intermediate.kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers.{i}.intermediate.bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers.{i}.output.kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers.{i}.output.bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers.{i}.output_norm.scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers.{i}.output_norm.bias", False),
    ("pooler.dense.weight", "pooler.kernel", True),
    ("pooler.dense.bias", "pooler.bias", False),
    ("cls.predictions.transform.dense.weight", "mlm.transform.kernel", True),
    ("cls.predictions.transform.dense.bias", "mlm.transform.bias", False),
    ("cls.predictions.transform.LayerNorm.weight", "mlm.norm.scale", False),
    ("cls.predictions.transform.LayerNorm.bias", "mlm.norm.bias", False),
    ("cls.predictions.bias", "mlm.bias", False),
    ("cls.seq_relationship.weight", "nsp.kernel", True),
    ("cls.seq_relationship.bias", "nsp.bias", False),
    ("classifier.weight", "classifier.kernel", True),
    ("classifier.bias", "classifier.bias", False),
]
_PARTS = ("query", "key", "value")
_PREFIX = "bert."
_HEAD_KEYS = ("cls.", "classifier.")  # HF keys that never carry the "bert." prefix
_HEADS = ("pooler", "mlm", "nsp", "classifier")  # our top-level modules a checkpoint may lack
# Keys HF writes that carry no parameters of their own: buffers and the decoder tied to the embeddings.
_DERIVED = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
_ARCHITECTURES = {"base": "BertModel", "masked-lm": "BertForMaskedLM", "pretraining": "BertForPreTraining",
                  "sequence-classification": "BertForSequenceClassification"}
_ALLOW = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.txt", "tokenizer*.json",
          "special_tokens_map.json"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> folder it was loaded from


def _pattern(template: str) -> re.Pattern:
    regex = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{part\}", r"(?P<part>query|key|value)")
    return re.compile(f"^{regex}$")


_RULES = [(_pattern(hf), ours, transpose) for hf, ours, transpose in _TABLE]


def _normalise(key: str) -> str:
    key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


# --------------------------------------------------------------------------------------------- files


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The Hugging Face folder that a model reference names: a run folder written by any training command
    (its model/), an HF folder as is, the packaged MiniLM ("packaged:all-MiniLM-L6-v2"), or a hub id
    downloaded through the Hugging Face cache."""
    from jaxopt_llm import paths
    from jaxopt_llm.assets import PACKAGED_MINILM, minilm_path

    if str(name_or_path) == PACKAGED_MINILM:
        return minilm_path()
    if paths.is_remote(name_or_path):  # a run or model folder in a bucket: its model, downloaded once
        remote = paths.Path(name_or_path)
        for candidate in (remote, remote / "model"):
            if (candidate / "config.json").is_file():
                return paths.local_copy(candidate)
        if (remote / "members" / "0" / "config.json").is_file():
            raise CheckpointError(f"{name_or_path!s} is an ensemble run: name a member, e.g. {remote / 'members' / '0'}.")
        raise CheckpointError(f"{name_or_path!s} holds no model (config.json, or a run folder's model/).")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            return path / "model"  # a run folder
        if not (path / "config.json").is_file() and (path / "members" / "0" / "config.json").is_file():
            raise CheckpointError(f"{str(path)!r} is an ensemble run (members/0, members/1, ...): prediction, "
                                  "distillation and sweeps take it whole; where one model is needed, name a member, "
                                  f"e.g. {str(path / 'members' / '0')!r}.")
        return path
    if path.exists():
        raise CheckpointError(f"{str(name_or_path)!r} is a file; pass the folder that holds config.json and "
                              "model.safetensors.")
    text = str(name_or_path)
    parent = path.parent
    if (not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) or text.startswith((".", "~"))
            or (str(parent) not in ("", ".") and parent.is_dir())):  # e.g. runs/tweets_tny: a local path
        near = sorted(p.name for p in parent.iterdir())[:10] if parent.is_dir() else []
        raise CheckpointError(f"folder {text!r} does not exist" + (f" ({str(parent)!r} holds {near})" if near else "")
                              + "; pass an existing run folder or model folder (config.json + model.safetensors), "
                              "or a Hugging Face hub id such as 'bert-base-uncased'.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=_ALLOW))
    except Exception as err:  # offline, unknown id, no cached copy: one message with the fix
        raise CheckpointError(
            f"could not get {text!r} from the Hugging Face hub or its local cache ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). If this machine is offline, download the model "
            "where the hub is reachable and pass its local folder instead, e.g. "
            "from_pretrained('/path/to/folder') with config.json and model.safetensors inside. (No local folder "
            f"{text!r} exists either.)") from None


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"no config.json in {str(folder)!r}: a Hugging Face BERT folder needs one "
                              "(write it with transformers' save_pretrained or jaxopt_llm.bert.save_pretrained).")
    return json.loads(file.read_text())


def task_of(folder: Path) -> str:
    """The `Bert` task a checkpoint folder was saved for, from config.json's architectures ("base" if none)."""
    names = read_config(folder).get("architectures") or []
    by_class = {cls: task for task, cls in _ARCHITECTURES.items()}
    return next((by_class[n] for n in names if n in by_class), "base")


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder as numpy arrays (safetensors, sharded or not; or pytorch_model.bin)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        return _read_torch(folder / "pytorch_model.bin")
    else:
        raise CheckpointError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in "
                              f"{str(folder)!r} (it holds {sorted(p.name for p in folder.iterdir())}).")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if not (folder / name).is_file():
            raise CheckpointError(f"the shard index names {name!r}, which is missing from {str(folder)!r}.")
        try:
            tensors.update(_load_safetensors(folder / name))
        except Exception as err:  # truncated or garbage: safetensors' own message is about bytes, not the file
            raise CheckpointError(f"{str(folder / name)!r} is not a readable safetensors file ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); re-download or re-export "
                                  "the checkpoint.") from None
    return tensors


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    """numpy's reader (no device round trip); bfloat16 files, which it cannot type, through the flax reader."""
    from safetensors import numpy as st_numpy

    try:
        return st_numpy.load_file(file)
    except KeyError:  # a dtype numpy lacks (BF16)
        from safetensors.flax import load_file

        return {k: np.asarray(v) for k, v in load_file(file).items()}


def _read_torch(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{str(file)!r} is a PyTorch pickle; install torch to read it, or convert the "
                              "checkpoint to model.safetensors.") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        if "weights_only" in str(err) or type(err).__name__ == "UnpicklingError":
            raise CheckpointError(f"{str(file)!r} was refused: it holds objects other than tensors, and unpickling "
                                  "them could run arbitrary code (torch.load(weights_only=True)). Convert it to "
                                  "model.safetensors where you trust the file.") from None
        raise CheckpointError(f"{str(file)!r} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}).") from None
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}


# ------------------------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=8)
def _fresh_init(config: BertConfig, task: str, names: tuple[str, ...]) -> Callable:
    """seed -> the freshly initialised tensors `names` of a model, as one compiled program (XLA drops the
    initialisers of every other tensor; eager, each initialiser op would compile on its own)."""
    def init(seed):
        flat = _flat(nnx.state(Bert(config, task, rngs=nnx.Rngs(jax.random.key(seed)))))  # = Rngs(seed)
        return {name: flat[name][...] for name in names}

    return jax.jit(init)


def _flat(state: nnx.State) -> dict[str, Any]:
    return {".".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(state)}


def _slot(ours: str, part: str | None, width: int) -> tuple[str, Any]:
    if part is None:
        return ours, ...
    j = _PARTS.index(part)
    return ours, (..., slice(j * width, (j + 1) * width))


def convert(tensors: dict[str, np.ndarray], config: BertConfig, task: str,
            template: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """HF tensors -> {our path: array} for the paths in `template` (path -> abstract array).

    Returns (params, missing our-paths, unused HF keys). Raises CheckpointError listing every shape mismatch.
    """
    width = config.hidden_size
    params = {path: np.zeros(leaf.shape, np.float32) for path, leaf in template.items()}
    filled: set[tuple[str, Any]] = set()
    unused, mismatches = [], []
    for key, tensor in tensors.items():
        name = _normalise(key)
        hit = next(((rule, m) for rule in _RULES if (m := rule[0].match(name))), None)
        if hit is None:
            if name not in _DERIVED:
                unused.append(key)
            continue
        (_, ours, transpose), m = hit
        groups = m.groupdict()
        path = ours.replace("{i}", groups.get("i") or "")
        if path not in params:
            unused.append(key)
            continue
        value = tensor.T if transpose else tensor
        slot = _slot(path, groups.get("part"), width)
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
    for path, leaf in template.items():
        parts = _PARTS if path.endswith(("qkv.kernel", "qkv.bias")) else (None,)
        if any((path, str(_slot(path, p, width)[1])) not in filled for p in parts):
            missing.append(path)
    return params, missing, unused


@functools.lru_cache(maxsize=16)
def _abstract(config: BertConfig, task: str) -> tuple[Any, Any]:
    """(graphdef, state of shapes) of a `Bert(config, task)`. Cached: tracing the constructor takes seconds, and
    neither part depends on the seed or is changed by its users."""
    return nnx.split(nnx.eval_shape(lambda: Bert(config, task, rngs=nnx.Rngs(0))))


def from_pretrained(name_or_path: str | os.PathLike, task: str = "base", *, num_labels: int | None = None,
                    dtype: str = "float32", param_dtype: str = "float32", seed: int = 0,
                    required: tuple[str, ...] = (), **config_changes: Any) -> Bert:
    """Load a Hugging Face BERT checkpoint (local folder or hub id) as a `Bert` for `task`.

    task: "base" | "masked-lm" | "pretraining" | "sequence-classification". Heads absent from the checkpoint
    are initialised from `seed` and named in one `CheckpointWarning`; unused tensors are named in another.
    Raises `CheckpointError` for a missing folder or file, an encoder tensor missing, or shape mismatches.
    `config_changes` override `BertConfig` fields of the checkpoint's config (dropout rates, labels).
    `required`: heads ("classifier", "mlm", ...) that must come from the checkpoint, not a fresh init.
    """
    if task not in TASKS:
        raise CheckpointError(f"task={task!r} is not one of {TASKS}.")
    folder = resolve(name_or_path)
    changes = {"dtype": dtype, "param_dtype": param_dtype, **config_changes}
    if num_labels is not None:
        changes["num_labels"] = num_labels
    config = BertConfig.from_hf_config(read_config(folder), **changes)
    tensors = read_weights(folder)

    unrolled = config.replace(scan_layers=False, remat="none", scan_unroll=False)  # checkpoints name layers one by one
    state = _abstract(unrolled, task)[1]
    graphdef = _abstract(config, task)[0]
    params, missing, unused = convert(tensors, config, task, _flat(state))
    encoder_missing = [p for p in missing if p.split(".")[0] not in _HEADS]
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
        fresh = _fresh_init(unrolled, task, tuple(sorted(missing)))(seed)
    if unused:
        warnings.warn(f"{len(unused)} tensor(s) in {str(name_or_path)!r} are not used by task={task!r}: "
                      f"{sorted(unused)}", CheckpointWarning, stacklevel=2)
    leaves = {path: (fresh[path] if path in missing else jnp.asarray(params[path], dtype=param_dtype))
              for path in params}
    if config.scan_layers:
        leaves = stack_layers(leaves, config.num_hidden_layers)
    state = nnx.from_flat_state({tuple(_key(p) for p in path.split(".")): v for path, v in leaves.items()})
    model = nnx.merge(graphdef, state)
    if any((folder / f).is_file() for f in _TOKENIZER_FILES):
        _SOURCES[model] = folder  # save_pretrained(model, out) writes this tokenizer along
    return model


def load_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None) -> Any:
    """The tokenizer saved in a model folder (any model reference), checked against the model: a folder
    without tokenizer files, or a tokenizer whose size or special ids do not fit `vocab_size` (default: the
    folder's config.json), is refused rather than silently mapping every word to [UNK]."""
    folder = resolve(folder)
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{str(folder)!r} has no tokenizer (tokenizer.json or vocab.txt). Save it with the "
                              "model (jaxopt_llm.save_pretrained(model, out, tokenizer=tokenizer)) or copy the "
                              "tokenizer files of the model it came from into the folder.")
    tokenizer = _tokenizer_class(folder).from_pretrained(folder)
    vocab_size = vocab_size or int(read_config(folder)["vocab_size"])
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "pad", "mask", "unk")}
    bad = {k: v for k, v in special.items() if v is not None and not 0 <= v < vocab_size}
    if not 0.9 * vocab_size <= len(tokenizer) <= vocab_size or bad:
        raise CheckpointError(f"the tokenizer in {str(folder)!r} does not fit the model: {len(tokenizer)} tokens"
                              + (f", special ids {bad}" if bad else "") + f", but the model's vocab_size is "
                              f"{vocab_size}. Use the tokenizer the model was trained with.")
    return tokenizer


def _tokenizer_class(folder: Path) -> Any:
    """BertTokenizer itself when the folder names it (what AutoTokenizer resolves it to, without importing the auto
    registry, and torch with it where torch is installed: seconds of every cold start), else AutoTokenizer."""
    config = folder / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    if name in ("BertTokenizer", "BertTokenizerFast"):
        from transformers.models.bert.tokenization_bert import BertTokenizer

        return BertTokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer


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


# ------------------------------------------------------------------------------------------- saving


def to_hf_tensors(model: Bert) -> dict[str, np.ndarray]:
    """Our parameters under Hugging Face key names, as the class for `model.task` expects them."""
    config, task = model.config, model.task
    flat = _flat(nnx.state(model, nnx.Param))
    if config.scan_layers:
        flat = unstack_layers(flat, config.num_hidden_layers)
    width = config.hidden_size
    out = {}
    for hf, ours, transpose in _TABLE:
        for i in range(config.num_hidden_layers) if "{i}" in hf else [None]:
            for part in _PARTS if "{part}" in hf else [None]:
                path = ours.replace("{i}", str(i))
                if path not in flat:
                    continue
                value = np.asarray(flat[path][...])[_slot(path, part, width)[1]]
                key = hf.replace("{i}", str(i)).replace("{part}", part or "")
                if task != "base" and not key.startswith(_HEAD_KEYS):
                    key = _PREFIX + key
                out[key] = np.ascontiguousarray(value.T if transpose else value)
    return out


def save_pretrained(model: Bert, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
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
    hf_config = model.config.to_hf_config(architectures=(_ARCHITECTURES[model.task],))
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(hf_config.to_json_string(use_diff=False))
        source = _SOURCES.get(model)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        elif source is not None:
            for name in _TOKENIZER_FILES:
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
