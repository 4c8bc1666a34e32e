"""Model files, whatever the family: resolving a model reference to a Hugging Face folder, its config, its
weights (safetensors, sharded or not; PyTorch pickles only with weights_only), and its tokenizer."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt_llm.errors import UserError


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model; the message says what to change."""


class CheckpointWarning(UserWarning):
    """Keys were missing (freshly initialised heads) or unused when loading a checkpoint."""


ALLOW = ["config.json", "*.safetensors", "model.safetensors.index.json", "vocab.txt", "vocab.json", "merges.txt",
         "tokenizer*.json", "special_tokens_map.json", "*.model", "sentencepiece.bpe.model"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "sentencepiece.bpe.model", "spm.model")


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
            raise CheckpointError(f"{name_or_path!s} is an ensemble run: name a member, e.g. "
                                  f"{remote / 'members' / '0'}.")
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

        return Path(snapshot_download(repo_id=text, allow_patterns=ALLOW))
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
        raise CheckpointError(f"no config.json in {str(folder)!r}: a Hugging Face model folder needs one "
                              "(write it with transformers' save_pretrained or jaxopt_llm's save_pretrained).")
    return json.loads(file.read_text())


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


def load_tokenizer(folder: str | os.PathLike, vocab_size: int | None = None) -> Any:
    """The tokenizer saved in a model folder (any model reference), checked against the model: a folder
    without tokenizer files, or a tokenizer whose size or special ids do not fit `vocab_size` (default: the
    folder's config.json), is refused rather than silently mapping every word to [UNK]."""
    folder = resolve(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
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
