"""Load and run an exported artifact (see jaxopt_llm/export.py) with jax, numpy and tokenizers only.

`Artifact.load(path)` checks the sha256 of every file against the manifest and the golden outputs against
a fresh run of the functions; a changed or missing file is one clear error. `predict(texts)` pads to the
smallest length bucket and a power-of-two batch, so new requests reuse compiled programs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I32": np.int32, "I64": np.int64}


class ArtifactError(ValueError):
    """An artifact is incomplete, changed or does not reproduce its golden outputs."""


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy arrays: an 8-byte little-endian header length, a JSON header, raw data."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ArtifactError(f"{file}: tensor {name} has dtype {info['dtype']}, which this loader does not read.")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
    return out


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Artifact:
    def __init__(self, path: Path, manifest: dict, functions: dict, weights: list, tokenizer, prompt: dict | None,
                 reference: dict | None, reference_cls: np.ndarray | None):
        self.path, self.manifest, self.functions, self.weights = path, manifest, functions, weights
        self.tokenizer, self.prompt = tokenizer, prompt
        self.reference, self.reference_cls = reference, reference_cls
        self.labels: list[str] = manifest["labels"]
        self.buckets: list[int] = manifest["buckets"]
        self.name = path.name

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Artifact:
        import jax
        from jax import export
        from tokenizers import Tokenizer

        from jaxopt_llm import paths

        path = paths.local_copy(path)  # an artifact in a bucket is downloaded once into the cache
        if not (path / "manifest.json").is_file():
            raise ArtifactError(f"{str(path)!r} is not an artifact (no manifest.json); write one with "
                                "`jaxopt-llm export RUN --out ART`.")
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != "jaxopt-llm-artifact":
            raise ArtifactError(f"{path / 'manifest.json'} is not a jaxopt-llm artifact manifest.")
        if verify:
            problems = []
            for name, digest in manifest["files"].items():
                file = path / name
                if not file.is_file():
                    problems.append(f"{name} is missing")
                elif _sha256(file) != digest:
                    problems.append(f"{name} has changed (sha256 differs from the manifest)")
            if problems:
                raise ArtifactError(f"artifact {str(path)!r} is not as exported: {'; '.join(problems[:10])}. "
                                    "Export it again.")
        functions = {t: export.deserialize((path / "functions" / f"predict_{t}.jax").read_bytes())
                     for t in manifest["buckets"]}
        tensors = read_safetensors(path / "weights.safetensors")
        weights = [jax.device_put(tensors[f"w{i:05d}"]) for i in range(manifest["weights"])]
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_padding()  # shapes are ours: buckets and power-of-two batches
        tokenizer.no_truncation()
        prompt = json.loads((path / "prompt.json").read_text()) if (path / "prompt.json").is_file() else None
        reference = json.loads((path / "reference.json").read_text()) if (path / "reference.json").is_file() else None
        ref_cls = (read_safetensors(path / "reference.safetensors")["cls"]
                   if (path / "reference.safetensors").is_file() else None)
        artifact = cls(path, manifest, functions, weights, tokenizer, prompt, reference, ref_cls)
        if verify:
            artifact.check_golden()
        return artifact

    def check_golden(self) -> None:
        golden = json.loads((self.path / "golden.json").read_text())
        probs, _ = self.predict(golden["texts"])
        worst = float(np.max(np.abs(probs - np.asarray(golden["probabilities"]))))
        if not worst <= golden["tolerance"]:
            raise ArtifactError(f"artifact {str(self.path)!r} does not reproduce its golden outputs on this machine "
                                f"(max difference {worst:.2e} > {golden['tolerance']}): platform "
                                f"{self.manifest['platforms']} mismatch, or the files were altered.")

    # ---- inputs ------------------------------------------------------------------------------------------
    def _encode(self, texts: Sequence[str]) -> tuple[int, dict[str, np.ndarray]]:
        if self.prompt is not None:
            from jaxopt_llm.packing import pack

            ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
            p = self.prompt
            pieces = [x if isinstance(x, str) else tuple(x) for x in p["pieces"]]
            arrays = pack(pieces, p["lengths"], p["special"], p["max_length"], ids)
            return p["max_length"], arrays
        limit = max(self.buckets)
        encodings = self.tokenizer.encode_batch(list(texts))
        longest = max(min(len(e.ids), limit) for e in encodings)
        t = next((b for b in self.buckets if b >= longest), limit)
        pad = self.manifest["special"]["pad"]
        arrays = {"input_ids": np.full((len(texts), t), pad, np.int32),
                  "attention_mask": np.zeros((len(texts), t), np.int32),
                  "token_type_ids": np.zeros((len(texts), t), np.int32)}
        sep = self.manifest["special"]["sep"]
        for r, e in enumerate(encodings):
            ids = list(e.ids)
            if len(ids) > t:  # truncate, keeping the final [SEP]
                ids = ids[:t - 1] + [sep]
            arrays["input_ids"][r, :len(ids)] = ids
            arrays["attention_mask"][r, :len(ids)] = 1
            arrays["token_type_ids"][r, :len(ids)] = list(e.type_ids)[:len(ids)]
        return t, arrays

    def predict(self, texts: Sequence[str], max_batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, c), [CLS] embeddings (n, d)) for texts; batches are padded to a power of two."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not one string.")
        probs, cls = [], []
        for start in range(0, len(texts), max_batch):
            chunk = list(texts[start:start + max_batch])
            t, arrays = self._encode(chunk)
            b = 1 << (len(chunk) - 1).bit_length()
            padded = [np.concatenate([a, np.repeat(a[:1], b - len(chunk), 0)]) if b > len(chunk) else a
                      for a in (arrays[k] for k in self.manifest["inputs"])]
            p, c = self.functions[t].call(self.weights, *padded)
            probs.append(np.asarray(p)[:len(chunk)])
            cls.append(np.asarray(c)[:len(chunk)])
        return np.concatenate(probs), np.concatenate(cls)

    def classify(self, texts: Sequence[str], top_k: int = 1) -> list[list[dict]]:
        """Per text its top_k {label, score}, highest first (the Hugging Face text-classification shape)."""
        probs, _ = self.predict(texts)
        order = np.argsort(-probs, -1)[:, :top_k]
        return [[{"label": self.labels[int(j)], "score": float(row[j])} for j in idx] for row, idx in zip(probs, order)]
