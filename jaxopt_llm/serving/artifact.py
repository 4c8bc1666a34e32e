"""Load and run an exported artifact (see jaxopt_llm/export.py) with jax, numpy and tokenizers only.

`Artifact.load(path)` checks the sha256 of every file against the manifest and the golden outputs against
a fresh run of the functions; a changed or missing file is one clear error. `predict(texts)` cuts texts to
the run's max_length (the manifest's) and pads to the smallest length bucket and a power-of-two batch, so
new requests reuse compiled programs. `jaxopt_llm.inference.load(path)` wraps it like any other model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxopt_llm.errors import UserError

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None, "I32": np.int32, "I64": np.int64, "I8": np.int8}


class ArtifactError(UserError):
    """An artifact is incomplete, changed or does not reproduce its golden outputs."""


MANIFEST_SUM = "manifest.sha256"  # JSON: the sha256 of the manifest's canonical form and of each of its fields


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_digests(manifest: dict) -> dict:
    """What manifest.sha256 holds: the digest of the whole manifest (canonical JSON) and one per field, so a
    change is reported by the names of the fields it touched."""
    import hashlib

    return {"manifest": hashlib.sha256(_canonical(manifest)).hexdigest(),
            "fields": {k: hashlib.sha256(_canonical(v)).hexdigest() for k, v in sorted(manifest.items())}}


def check_manifest(path: Path, manifest: dict, required: bool) -> None:
    """The manifest against manifest.sha256: any change is one error naming the changed fields."""
    file = path / MANIFEST_SUM
    if not file.is_file():
        if required:
            raise ArtifactError(f"artifact {str(path)!r} has no {MANIFEST_SUM}: its manifest cannot be checked. "
                                "Export it again.")
        return
    try:
        recorded = json.loads(file.read_text())
        fields = recorded["fields"]
    except (ValueError, KeyError, TypeError):
        raise ArtifactError(f"{file} is not a manifest checksum file. Export the artifact again.") from None
    now = manifest_digests(manifest)
    if now["manifest"] != recorded.get("manifest"):
        changed = sorted(k for k in set(fields) | set(now["fields"]) if fields.get(k) != now["fields"].get(k))
        raise ArtifactError(f"artifact {str(path)!r}: manifest.json has changed since export (field(s) "
                            f"{', '.join(changed) or 'unknown'}). Export it again.")


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


BACKENDS = ("jax", "onnxruntime")


class Artifact:
    """An exported artifact, loaded: `Artifact.load(path, backend="jax" | "onnxruntime")` checks its sums
    and golden outputs, and `classify`, `tag`, `answer` (by the exported kind) predict as the run did, texts
    batched in length order. Needs numpy, `tokenizers` and jax or onnxruntime, not flax,
    transformers or the package's model code."""

    def __init__(self, path: Path, manifest: dict, functions: dict, weights: list, tokenizer, prompt: dict | None,
                 reference: dict | None, reference_cls: np.ndarray | None, session=None):
        self.path, self.manifest, self.functions, self.weights = path, manifest, functions, weights
        self.session = session  # an onnxruntime.InferenceSession of model.onnx, which then runs every batch
        self.tokenizer, self.prompt = tokenizer, prompt
        self.reference, self.reference_cls = reference, reference_cls
        self.labels: list[str] = manifest["labels"]
        self.buckets: list[int] = manifest["buckets"]
        # artifacts written before the length was recorded cut at their largest bucket
        self.max_length: int = int(manifest.get("max_length") or max(self.buckets))
        self.name = path.name
        from jaxopt_llm import packing

        self.backend = packing.truncating(tokenizer, None if prompt is not None else self.max_length)

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, backend: str = "jax") -> Artifact:
        """The artifact at `path` (local or gs://), its files checked against the manifest and its golden
        outputs reproduced when `verify`. backend="onnxruntime" runs model.onnx (an export with --format onnx)
        instead of the jax.export functions: the same tokenization and outputs, each batch padded to its longest
        text instead of a bucket."""
        from tokenizers import Tokenizer

        from jaxopt_llm import paths

        path = paths.local_copy(path)  # an artifact in a bucket is downloaded once into the cache
        if not (path / "manifest.json").is_file():
            raise ArtifactError(f"{str(path)!r} is not an artifact (no manifest.json); write one with "
                                "`jaxopt-llm export RUN --out ART`.")
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except ValueError as err:
            raise ArtifactError(f"{path / 'manifest.json'} is not valid JSON ({err}). Export the artifact again.") \
                from None
        if not isinstance(manifest, dict) or manifest.get("format") != "jaxopt-llm-artifact":
            raise ArtifactError(f"{path / 'manifest.json'} is not a jaxopt-llm artifact manifest.")
        check_manifest(path, manifest, required=verify)
        missing = [k for k in ("kind", "labels", "buckets", "inputs", "weights", "special", "files")
                   if k not in manifest]
        if missing:
            raise ArtifactError(f"{path / 'manifest.json'} lacks {', '.join(missing)}. Export the artifact again.")
        if verify:
            problems = []
            for name, digest in manifest["files"].items():
                file = path / name
                if not file.is_file():
                    problems.append(f"{name} is missing")
                elif paths.sha256(file) != digest:
                    problems.append(f"{name} has changed (sha256 differs from the manifest)")
            if problems:
                raise ArtifactError(f"artifact {str(path)!r} is not as exported: {'; '.join(problems[:10])}. "
                                    "Export it again.")
        if backend not in BACKENDS:
            raise ArtifactError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}.")
        session = functions = weights = None
        if backend == "onnxruntime":
            session = _onnx_session(path, manifest)
        else:  # jax only here: an ONNX Runtime server starts without importing it
            import jax
            from jax import export

            functions = {t: export.deserialize((path / "functions" / f"predict_{t}.jax").read_bytes())
                         for t in manifest["buckets"]}
            tensors = read_safetensors(path / "weights.safetensors")
            weights = [jax.device_put(tensors[f"w{i:05d}"]) for i in range(manifest["weights"])]
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        prompt = json.loads((path / "prompt.json").read_text()) if (path / "prompt.json").is_file() else None
        reference = json.loads((path / "reference.json").read_text()) if (path / "reference.json").is_file() else None
        ref_cls = (read_safetensors(path / "reference.safetensors")["cls"]
                   if (path / "reference.safetensors").is_file() else None)
        artifact = cls(path, manifest, functions, weights, tokenizer, prompt, reference, ref_cls, session)
        if verify:
            artifact.check_golden()
        return artifact

    def golden_outputs(self, texts: Sequence[str]) -> np.ndarray:
        """What golden.json records: probabilities (n, c), a tagger's token probabilities concatenated, or a
        reader's span logits of each text asked about itself (padding excluded)."""
        if self.manifest["kind"] == "reader":
            logits, masks, _, _ = self.span_logits(list(texts), list(texts))
            return np.concatenate([x[:, m > 0] for x, m in zip(logits, masks)], 1)
        if self.manifest["kind"] == "tagger":
            (probs,) = self.tag_probs_encoded(self.encode(texts))
            return np.concatenate(probs)
        return self.predict(texts)[0]

    def check_golden(self) -> None:
        golden = json.loads((self.path / "golden.json").read_text())
        texts = golden["texts"]
        if self.session is not None and "onnx" in golden:  # an int8-dynamic graph has its own golden outputs
            golden = golden["onnx"]
        probs = self.golden_outputs(texts)
        worst = float(np.max(np.abs(probs - np.asarray(golden["probabilities"]))))
        if not worst <= golden["tolerance"]:
            raise ArtifactError(f"artifact {str(self.path)!r} does not reproduce its golden outputs on this machine "
                                f"(max difference {worst:.2e} > {golden['tolerance']}): platform "
                                f"{self.manifest['platforms']} mismatch, or the files were altered.")

    # ---- inputs ------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> list:
        """The texts' encodings, cut to the artifact's max_length (`packing`'s rule, as in training); a text
        the tokenizer cannot take fails here, apart from any batch it would join."""
        from jaxopt_llm import packing

        return packing.encode(self.backend, texts, special_tokens=self.prompt is None)

    def batches(self, texts: Sequence[str], max_batch: int = 64):
        """(rows of texts, padded arrays) in order: chunks of `max_batch`, each padded to the smallest bucket
        holding its longest text. A prompt artifact packs its pattern at its own length."""
        return self.batches_of(self.encode(texts), max_batch)

    def batches_of(self, encodings: Sequence, max_batch: int = 64):
        from jaxopt_llm import packing

        for start in range(0, len(encodings), max_batch):
            chunk = list(encodings[start:start + max_batch])
            rows = np.arange(start, start + len(chunk))
            if self.prompt is not None:
                p = self.prompt
                pieces = [x if isinstance(x, str) else tuple(x) for x in p["pieces"]]
                yield rows, packing.pack(pieces, p["lengths"], p["special"], p["max_length"], [e.ids for e in chunk])
            else:  # ONNX Runtime takes any length: a batch is padded to its longest text only
                longest = max(len(e.ids) for e in chunk)
                t = longest if self.session is not None else packing.bucket(longest, self.buckets)
                yield rows, packing.rows(chunk, t, self.manifest["special"]["pad"])

    def run(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (b, c), [CLS] embeddings (b, d)) of token arrays whose length is a bucket (on ONNX
        Runtime: any length up to max_length); the jax.export functions' batch is padded to a power of two so
        new requests reuse compiled programs."""
        from jaxopt_llm import packing

        names = self.manifest["inputs"]
        t = self.prompt["max_length"] if self.prompt is not None else arrays[names[0]].shape[1]
        n = len(arrays[names[0]])
        if self.session is not None:  # any batch size and length up to max_length: no padding
            if t > self.max_length:
                raise ArtifactError(f"token arrays of length {t}: this artifact runs at most {self.max_length}.")
            p, c = self.session.run(None, {k: np.asarray(arrays[k], np.int32) for k in names})
            return p, c
        if t not in self.buckets:
            raise ArtifactError(f"token arrays of length {t}: this artifact runs lengths {sorted(self.buckets)}.")
        padded = packing.pad_rows({k: np.asarray(arrays[k], np.int32) for k in names}, packing.power_of_two(n))
        p, c = self.functions[t].call(self.weights, *(padded[k] for k in names))
        return np.asarray(p)[:n], np.asarray(c)[:n]

    def predict(self, texts: Sequence[str], max_batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, c), [CLS] embeddings (n, d)) for texts."""
        return self.predict_encoded(self.encode(texts), max_batch)

    def predict_encoded(self, encodings: Sequence, max_batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, c), [CLS] embeddings (n, d)) for encodings made by `encode`, batched in length
        order (each batch padded to the bucket of its longest text) and returned in the given order."""
        if not encodings:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros((0, 0), np.float32)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        outputs = [self.run(arrays) for _, arrays in self.batches_of([encodings[i] for i in order], max_batch)]
        probs, cls = (np.concatenate(xs) for xs in zip(*outputs))
        given = np.argsort(order)  # row i of the sorted batches is text order[i]
        return probs[given], cls[given]

    def tag_probs_encoded(self, encodings: Sequence, max_batch: int = 64) -> tuple[list]:
        """A tagger's (per text, its token probabilities (tokens, c)) for encodings made by `encode`, as a
        1-tuple (the micro-batcher's shape: outputs split by rows)."""
        out: list = []
        for rows, arrays in self.batches_of(encodings, max_batch):
            probs, _ = self.run(arrays)
            out += [probs[j, :len(encodings[r].ids)] for j, r in enumerate(rows)]
        return (out,)

    def tag(self, texts: Sequence[str], aggregation: str = "first") -> list[list[dict]]:
        """A tagger's entities per text with character offsets (`jaxopt_llm.tagging`)."""
        from jaxopt_llm import tagging

        encodings = self.encode(texts)
        (probs,) = self.tag_probs_encoded(encodings)
        return [tagging.decode(t, e, p, self.labels, aggregation) for t, e, p in zip(texts, encodings, probs)]

    # ---- extractive QA (kind "reader") -------------------------------------------------------------------
    def hf_tokenizer(self):
        """The transformers tokenizer saved in hf/ (QA windows need its overflow and offsets)."""
        if getattr(self, "_hf_tokenizer", None) is None:
            from jaxopt_llm.models import load_tokenizer

            self._hf_tokenizer = load_tokenizer(self.path / "hf")
        return self._hf_tokenizer

    def span_logits(self, questions: Sequence[str], contexts: Sequence[str], stride: int | None = None,
                    max_batch: int = 64):
        """Per window: (start / end logits (2, t), attention mask (t,)), with each window's example and its
        tokens' character spans: (logits, masks, example_of, offsets)."""
        from jaxopt_llm import answers, packing

        stride = self.manifest["qa"]["stride"] if stride is None else stride
        answers.check_stride(stride, self.max_length)
        rows, example_of, offsets = packing.qa_windows(self.hf_tokenizer(), questions, contexts, self.max_length,
                                                       stride)
        logits = []
        for start in range(0, len(example_of), max_batch):
            chunk = {k: v[start:start + max_batch] for k, v in rows.items()}
            out, _ = self.run(chunk)
            logits += list(out)
        return logits, list(rows["attention_mask"]), example_of, offsets

    def answer(self, questions: Sequence[str], contexts: Sequence[str], **options) -> list[dict]:
        """Per question its {answer, score, start, end} (`answers.answer`); options stride, max_answer_length,
        no_answer (default: the manifest's)."""
        from jaxopt_llm import answers

        qa = {**self.manifest["qa"], **{k: v for k, v in options.items() if v is not None}}
        logits, _, example_of, offsets = self.span_logits(list(questions), list(contexts), qa["stride"])
        return answers.from_windows(list(contexts), example_of, logits, offsets, qa["max_answer_length"],
                                    qa["no_answer"])

    def answer_pairs(self, pairs: Sequence[tuple[str, str]], **options) -> tuple[list]:
        """`answer` of (question, context) pairs as a 1-tuple (the micro-batcher's shape)."""
        return (self.answer([q for q, _ in pairs], [c for _, c in pairs], **options),)

    def classify(self, texts: Sequence[str], top_k: int = 1) -> list[list[dict]]:
        """Per text its top_k {label, score}, highest first (the Hugging Face text-classification shape)."""
        probs, _ = self.predict(texts)
        order = np.argsort(-probs, -1)[:, :top_k]
        return [[{"label": self.labels[int(j)], "score": float(row[j])} for j in idx] for row, idx in zip(probs, order)]


def _onnx_session(path: Path, manifest: dict):
    """An ONNX Runtime session of the artifact's model.onnx, or one error saying how to get one."""
    entry = manifest.get("onnx")
    if not entry:
        raise ArtifactError(f"artifact {str(path)!r} has no ONNX model; export the run again with --format onnx.")
    try:
        import onnxruntime
    except ImportError:
        raise ArtifactError("--backend onnxruntime needs onnxruntime: `pip install 'jaxopt_llm[onnx]'`.") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path / entry["file"]), options, providers=["CPUExecutionProvider"])
