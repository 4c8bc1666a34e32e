"""`jaxopt-llm export RUN --out ART`: a portable prediction artifact built with `jax.export`.

ART/
  manifest.json            kind, labels, buckets, platforms, temperature, members, versions, calling-convention
                           version, and the sha256 of every other file
  functions/predict_<T>.jax one serialised `jax.export` function per sequence-length bucket T, with a
                           symbolic batch dimension: (weights..., input arrays...) -> (probabilities (b, c),
                           or (b, T, c) per token for a tagger, [CLS] embeddings (b, d))
  weights.safetensors      the parameters, in the functions' argument order
  tokenizer.json           the tokenizer (the `tokenizers` library reads it)
  prompt.json              prompt runs: the pattern as token pieces and the verbalizer as token ids
  reference.json / reference.safetensors   drift reference: confidences, class distribution, [CLS] sample
  golden.json              texts and the outputs this export gave for them (checked on every load)
  hf/                      the same model as a Hugging Face folder (an ensemble's members under hf/members)
  model.onnx               with format="onnx": the same function as one ONNX graph (weights as initializers,
                           symbolic batch and sequence axes), for ONNX Runtime (`serve --backend onnxruntime`)

Weights are inputs, not constants: one copy serves every bucket (constants would be baked into each
function), the functions stay small, and the weights are inspectable and replaceable. Temperature and an
ensemble's member axis are part of the function (the parameters carry the member axis; the function vmaps
over it and averages probabilities).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxopt_llm import packing, paths
from jaxopt_llm import quantize as quantize_lib
from jaxopt_llm.errors import UserError
from jaxopt_llm.models import resolve
from jaxopt_llm.runs import write_json
from jaxopt_llm.serving.artifact import MANIFEST_SUM, manifest_digests

CALLING = 1  # our calling convention: (flat weights..., inputs...) -> (probs, cls); bump on change
BUCKETS = (16, 32, 64, 128)
CLASSIFY_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PROMPT_INPUTS = ("prompt_ids", "prompt_mask", "prompt_types", "prompt_slots")


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def check_platforms(platforms: Sequence[str]) -> None:
    if isinstance(platforms, str) or not platforms or any(p not in PLATFORMS for p in platforms):
        given = platforms if isinstance(platforms, str) else ",".join(map(str, platforms))
        raise UserError(f"--platforms {given!r}: use one or more of {', '.join(PLATFORMS)}, comma-separated.")


def buckets_for(requested: Sequence[int] | None, max_length: int) -> tuple[int, ...]:
    """The length buckets of an export: those asked for (default `BUCKETS`) below the run's max_length, then
    max_length itself, so every text is cut where training cut it. A list that stops short is refused."""
    if requested is None:
        return packing.buckets_for(max_length, BUCKETS)
    requested = tuple(requested)
    bad = [b for b in requested if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if not requested or bad:
        raise UserError(f"--buckets {','.join(map(str, requested))}: every bucket must be a positive whole number "
                         "of tokens.")
    if max(requested) < max_length:
        raise UserError(f"--buckets {','.join(map(str, requested))} do not cover the model's max_length="
                         f"{max_length} tokens (what it was trained on): add {max_length}, or leave --buckets out "
                         "for the default.")
    return packing.buckets_for(max_length, requested)


def _model_function(model, unrolled: bool = False):
    """(params, fn(params, batch) -> (probs at temperature 1, [CLS] embedding), extra manifest fields) of an
    `inference.Inference`. `unrolled`: an ensemble's members one after another instead of vmapped (the ONNX
    converter's embedding lookup has no batching rule)."""
    from jaxopt_llm.steps.ensemble import combine

    engine = model.engine
    graphdef, params = engine.graphdef, engine.state

    def encoded(p, batch, head_only: bool = False):  # (the model, its last hidden states) of one member's
        m = nnx.merge(graphdef, p)  # parameters; head_only: the last layer only where the class head reads
        ids = batch["input_ids"]  # ([CLS], or every position for mean pooling), as in-process prediction
        where = m.read_positions(ids.shape[0]) if head_only else None
        return m, m.encode(m.embed(ids), batch["attention_mask"], batch["token_type_ids"], output_positions=where)

    def classify(p, batch):  # (class logits, [CLS] hidden state) of one model
        m, hidden = encoded(p, batch, head_only=True)
        return m.classify_logits(hidden, attention_mask=batch["attention_mask"]), hidden[:, 0]

    if model.kind == "ensemble":
        from jaxopt_llm import lora

        adapters = lora.adapter_ensemble(model)  # the base once, each member's adapters and head
        expand = adapters[1] if adapters is not None else (lambda p: p)

        def fn(p, batch):
            p = expand(p)
            if unrolled:
                each = [classify(jax.tree.map(lambda x: x[i], p), batch) for i in range(engine.members)]
                logits, cls = (jnp.stack(xs) for xs in zip(*each))
            else:
                logits, cls = jax.vmap(lambda q: classify(q, batch))(p)
            return combine(logits, "mean-prob"), cls.mean(0)

        return (adapters[0] if adapters is not None else params), fn, {"members": engine.members}
    if model.kind == "prompt":
        task = engine.prompt

        def fn(p, batch):
            m = nnx.merge(graphdef, p)
            emb = m.embed(batch["prompt_ids"])
            scores = task.forward(m, emb, batch, None)
            t = task.encoded.max_length  # the first block's [CLS], through the encoder
            hidden = m.encode(emb[:, :t], batch["prompt_mask"][:, :t], batch["prompt_types"][:, :t])
            return jax.nn.softmax(scores, -1), hidden[:, 0]

        return params, fn, {"prompt": task.encoded.to_json()}
    if model.kind in ("tagger", "reader") and model.members:
        raise UserError(f"{model.reference!r} is an ensemble of {model.kind}s: export one member "
                        f"({model.members[0]}); such ensembles predict as one in-process but do not export yet.")
    if model.kind == "reader":  # start and end logits (b, 2, t), padding at the float32 minimum
        def fn(p, batch):
            m, hidden = encoded(p, batch)
            start, end = m.span_logits(hidden)
            keep = (batch["attention_mask"] > 0)[:, None, :]
            return jnp.where(keep, jnp.stack([start, end], 1), jnp.finfo(jnp.float32).min), hidden[:, 0]

        return params, fn, {"qa": {"stride": 32, "max_answer_length": 30, "no_answer": False, **model.options}}
    if model.kind == "tagger":  # tag probabilities at every position (b, t, c)
        def fn(p, batch):
            m, hidden = encoded(p, batch)
            return jax.nn.softmax(m.token_logits(hidden), -1), hidden[:, 0]

        return params, fn, {}
    if model.kind != "classifier":
        raise UserError(f"{model.reference!r} is a {model.kind} model; export serves classifiers, ensembles, "
                         "prompt runs and token classifiers.")
    if len(model.labels) < 2:
        raise UserError(f"{model.reference!r} is a regression model; export serves classifiers.")

    def fn(p, batch):
        logits, cls = classify(p, batch)
        return jax.nn.softmax(logits, -1), cls

    return params, fn, {}


FORMATS = ("jax", "onnx")
ONNX_TOLERANCE = 1e-4  # ONNX Runtime against the jax.export function, on every output
# an int8-dynamic graph against its own export-time outputs: other CPUs' integer kernels (VNNI or not) may
# saturate and round the uint8 x int8 products differently
ONNX_INT8_GOLDEN_TOLERANCE = 1e-2


def export(reference: str, out: str | Path, *, platforms: Sequence[str] = ("cpu",),
           buckets: Sequence[int] | None = None, reference_texts: Sequence[str] = (),
           golden_texts: Sequence[str] = (), max_length: int | None = None, format: str = "jax",
           quantize: str | None = None) -> Path:
    """Write the artifact of a run (classifier, tagger, reader, ensemble or prompt run) or model folder to `out`,
    whole or not at all. Texts are cut to the run's max_length (`max_length` for a bare model folder; default
    its positions); `buckets` must reach it (default: 16, 32, 64, 128 below it, then it). `reference_texts`
    (e.g. the eval split) give the drift reference; `golden_texts` are checked on load. format="onnx" adds
    model.onnx, checked against the jax.export function on random lengths before anything is written.
    quantize="int8" stores the dense layers' kernels as int8 with a scale per output column
    (`jaxopt_llm.quantize`); quantize="int8-dynamic" (format="onnx") puts model.onnx's dense layers on ONNX
    Runtime's integer kernels after the float graph passed its check, and records how far its outputs are
    from float32 on the given texts."""
    from jax import export as jax_export
    from safetensors.numpy import save_file

    from jaxopt_llm.serving.artifact import Artifact

    check_platforms(platforms)
    if format not in FORMATS:
        raise UserError(f"--format {format!r}: use one of {', '.join(FORMATS)}.")
    if format == "onnx":
        converter_version()  # a missing converter fails before any work
    if quantize is not None and quantize not in quantize_lib.MODES:
        raise UserError(f"--quantize {quantize!r}: use {', '.join(quantize_lib.MODES)} or leave it out (float32).")
    if quantize in quantize_lib.ONNX_ONLY and format != "onnx":
        raise UserError(f"--quantize {quantize}: it runs on ONNX Runtime's integer kernels; add --format onnx (or use "
                        "--quantize int8, weight-only, for the jax.export functions).")
    if paths.Path(out).exists():
        raise UserError(f"--out {str(out)!r} exists; pass a new folder (an artifact is written whole).")
    if paths.is_remote(out):  # written locally, then uploaded with manifest.json last: no manifest, no artifact
        with tempfile.TemporaryDirectory() as local:
            written = export(reference, Path(local) / "artifact", platforms=platforms, buckets=buckets,
                             reference_texts=reference_texts, golden_texts=golden_texts, max_length=max_length,
                             format=format, quantize=quantize)
            for item in sorted(written.iterdir(), key=lambda p: p.name == "manifest.json"):
                paths.copy(item, paths.Path(out) / item.name)
        return paths.Path(out)
    out = Path(out)
    missing = [p for p in out.parents if not p.exists()][::-1]  # folders to create, outermost first
    nearest = next(p for p in out.parents if p.exists())
    if not nearest.is_dir():
        raise UserError(f"--out {str(out)!r}: {str(nearest)!r} is a file, not a folder; pass another path.")
    for what, texts in (("reference", reference_texts), ("golden", golden_texts)):
        if isinstance(texts, str) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UserError(f"the {what} texts must be a list of non-empty strings.")
    from jaxopt_llm import inference
    from jaxopt_llm.models import task_of
    from jaxopt_llm.runs import RunFolder

    run = RunFolder.of(reference)
    held = run.kind() if run is not None else inference.KIND_OF_TASK.get(task_of(resolve(reference)))
    model = inference.load(reference, kind=held if held in ("tagger", "reader") else "classifier",
                           max_length=max_length)
    kind, labels, tokenizer, temperature = model.kind, model.labels, model.tokenizer, model.temperature
    if format == "onnx" and kind == "prompt":
        raise UserError(f"--format onnx: {reference!r} is a prompt run; its pattern is packed into blocks the ONNX "
                        "graph does not take. Export it with --format jax.")
    params, fn, extra = _model_function(model)
    # prompts pack at their own length, a reader's windows are always max_length long
    buckets = (model.max_length,) if kind in ("prompt", "reader") else buckets_for(buckets, model.max_length)
    treedef = jax.tree.structure(params)
    flat, expand = (quantize_lib.int8_kernels(params) if quantize == "int8"
                    else (jax.tree.leaves(params), lambda w: w))
    inputs = PROMPT_INPUTS if kind == "prompt" else CLASSIFY_INPUTS

    def predictor(fn):
        def predict(flat_params, *arrays):
            probs, cls = fn(jax.tree.unflatten(treedef, expand(flat_params)), dict(zip(inputs, arrays)))
            if temperature != 1.0 and kind != "reader":  # calibration: softmax(log p / T)
                probs = jax.nn.softmax(jnp.log(jnp.maximum(probs, 1e-30)) / temperature, -1)
            return probs, cls.astype(jnp.float32)

        return predict

    predict = predictor(fn)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # whole or not at all: a failure leaves no .tmp folder behind, nor the folders made for it
        for folder in missing:
            folder.mkdir()
        (tmp / "functions").mkdir(parents=True)
        weight_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat]
        (b,) = jax_export.symbolic_shape("b")
        for t in buckets:
            if kind == "prompt":
                L, K = len(extra["prompt"]["lengths"]), max(extra["prompt"]["lengths"])
                specs = ([jax.ShapeDtypeStruct((b, L * t), jnp.int32)] * 3
                         + [jax.ShapeDtypeStruct((b, L, K), jnp.int32)])
            else:
                specs = [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 3
            exported = jax_export.export(jax.jit(predict), platforms=tuple(platforms))(weight_specs, *specs)
            (tmp / "functions" / f"predict_{t}.jax").write_bytes(exported.serialize())
        save_file({f"w{i:05d}": np.ascontiguousarray(x) for i, x in enumerate(flat)}, str(tmp / "weights.safetensors"))
        # the padding / truncation a training run left set are not the artifact's: it cuts at manifest max_length
        packing.truncating(tokenizer.backend_tokenizer, None).save(str(tmp / "tokenizer.json"))
        if kind == "prompt":
            write_json(tmp / "prompt.json", extra["prompt"])
        if format == "onnx":
            unrolled = predictor(_model_function(model, unrolled=True)[1]) if kind == "ensemble" else predict
            onnx_entry = write_onnx(unrolled, flat, kind, model.max_length, tmp / "model.onnx")
        # the Hugging Face export of the same model, beside it
        if kind == "ensemble":
            for i, member in enumerate(model.members):
                shutil.copytree(paths.local_copy(member), tmp / "hf" / "members" / str(i))
        else:
            shutil.copytree(resolve(reference), tmp / "hf")
        special = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "pad": tokenizer.pad_token_id,
                   "mask": tokenizer.mask_token_id}
        first = jax_export.deserialize((tmp / "functions" / f"predict_{buckets[0]}.jax").read_bytes())
        manifest = {"format": "jaxopt-llm-artifact", "calling_convention": CALLING, "kind": kind,
                    "labels": list(labels), "buckets": list(buckets), "max_length": model.max_length,
                    "inputs": list(inputs), "platforms": list(platforms), "temperature": temperature,
                    "members": extra.get("members"), "special": special, "weights": len(flat), "source": str(reference),
                    "qa": extra.get("qa"), "onnx": onnx_entry if format == "onnx" else None, "quantize": quantize,
                    "jax_export_calling_convention": int(first.calling_convention_version),
                    "versions": {"jax": jax.__version__, "jaxlib": _version("jaxlib"),
                                 "jaxopt_llm": _version("jaxopt_llm")}}
        write_json(tmp / "manifest.json", {**manifest, "files": {}})
        artifact = Artifact.load(tmp, verify=False)  # the loader itself computes what the checks compare against
        if format == "onnx":
            check_onnx(artifact, Artifact.load(tmp, verify=False, backend="onnxruntime"))
        if quantize == "int8-dynamic":  # the float graph, checked above, becomes the integer one
            (tmp / "model.onnx").rename(tmp / "float.onnx")
            quantize_lib.onnx_dynamic_int8(tmp / "float.onnx", tmp / "model.onnx")
            (tmp / "float.onnx").unlink()
            onnx_artifact = Artifact.load(tmp, verify=False, backend="onnxruntime")
        texts = list(reference_texts) or list(golden_texts)
        if texts and kind not in ("tagger", "reader"):  # their outputs are per token: no drift reference
            probs, cls = artifact.predict(texts)
            rng = np.random.default_rng(0)
            sample = cls[rng.permutation(len(cls))[:256]]
            from safetensors.numpy import save_file as save

            save({"cls": sample.astype(np.float32)}, str(tmp / "reference.safetensors"))
            shares = np.bincount(probs.argmax(-1), minlength=len(labels)) / len(probs)
            write_json(tmp / "reference.json", {"confidence": [round(float(x), 6) for x in probs.max(-1)],
                                                "class_distribution": shares.tolist(), "examples": len(probs)})
        golden = list(golden_texts) or texts[:8] or ["golden input"]
        golden_probs = artifact.golden_outputs(golden)
        golden_file = {"texts": golden, "probabilities": golden_probs.tolist(), "tolerance": 1e-4}
        if quantize == "int8-dynamic":  # ONNX Runtime's own golden outputs, and how far they are from float32
            checked = texts or golden
            theirs, ours = onnx_artifact.golden_outputs(checked), artifact.golden_outputs(checked)
            manifest["onnx"]["against_float32"] = {
                "texts": len(checked), "max_difference": round(float(np.max(np.abs(theirs - ours))), 6),
                "changed_predictions": (round(float(np.mean(theirs.argmax(-1) != ours.argmax(-1))), 6)
                                        if kind != "reader" else None)}
            golden_file["onnx"] = {"probabilities": onnx_artifact.golden_outputs(golden).tolist(),
                                   "tolerance": ONNX_INT8_GOLDEN_TOLERANCE}
        write_json(tmp / "golden.json", golden_file)
        manifest["files"] = {str(p.relative_to(tmp)): paths.sha256(p) for p in sorted(tmp.rglob("*"))
                             if p.is_file() and p.name != "manifest.json"}
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / MANIFEST_SUM, manifest_digests(manifest))  # covers the manifest itself
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(missing):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    return out


def converter_version() -> str:
    """jax2onnx's version, or one error saying how to install it."""
    import importlib.util

    missing = [m for m in ("jax2onnx", "onnx", "onnx_ir", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}: `pip install 'jaxopt_llm[onnx]'` then "
                        "`pip install --no-deps jax2onnx==0.17.1` (its metadata pins orbax-checkpoint<0.11.37, "
                        "which conversion never imports and jaxopt_llm's checkpoints cannot use).")
    return _version("jax2onnx")


def write_onnx(predict, flat: list, kind: str, max_length: int, file: Path) -> dict:
    """`predict(flat, *token arrays)` as one ONNX graph in `file`: the weights its initializers, inputs
    input_ids / attention_mask / token_type_ids (batch, sequence) int32 with both axes symbolic (sequence at
    most `max_length`), outputs `probabilities` and `cls`. Returns the manifest's "onnx" entry."""
    import logging

    # jax2onnx imports its example plugins (equinox, dm-pix models) on first use and logs each it cannot
    for name in ("jax2onnx", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from jax import export as jax_export
    from jax2onnx import to_onnx

    weights = [jnp.asarray(x) for x in flat]
    b, t = jax_export.symbolic_shape("batch, sequence", constraints=(f"sequence <= {max_length}",))
    spec = jax.ShapeDtypeStruct((b, t), jnp.int32)
    try:
        proto = to_onnx(lambda *arrays: predict(weights, *arrays), [spec] * 3, model_name="jaxopt_llm",
                        input_names=list(CLASSIFY_INPUTS), output_names=["probabilities", "cls"],
                        return_mode="proto")
    except Exception as err:  # the converter's own message names the operation it lacks
        raise UserError(f"--format onnx: jax2onnx could not convert this {kind} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300]}). BERT, RoBERTa, XLM-R, DistilBERT and ELECTRA convert; "
                        "DeBERTa's relative positions and ModernBERT's local window need a known length. Export it "
                        "with --format jax.") from None
    dense_as_matmul(proto)
    file.write_bytes(proto.SerializeToString())
    return {"file": file.name, "converter": f"jax2onnx {converter_version()}",
            "opset": int(proto.opset_import[0].version),
            "inputs": list(CLASSIFY_INPUTS), "outputs": ["probabilities", "cls"], "tolerance": ONNX_TOLERANCE}


def dense_as_matmul(proto) -> int:
    """Rewrite in place each Einsum `...k,kn->...n` of an activation and a 2-D initializer (how jax2onnx writes
    a dense layer) as the MatMul it is, which ONNX Runtime runs on its GEMM directly and its quantizer can make
    integer; a Slice of initializers (a kernel cut for the [CLS]-only last layer) is folded into one first.
    Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    for node in list(graph.node):
        if node.op_type == "Slice" and all(name in initializers for name in node.input if name):
            data, starts, ends, *rest = [numpy_helper.to_array(initializers[n]) if n else None for n in node.input]
            axes = rest[0] if rest and rest[0] is not None else np.arange(len(starts))
            steps = rest[1] if len(rest) > 1 and rest[1] is not None else np.ones(len(starts), np.int64)
            cut = [slice(None)] * data.ndim
            for a, b, e, st in zip(axes, starts, ends, steps):
                cut[int(a)] = slice(int(b), int(e), int(st))
            folded = numpy_helper.from_array(np.ascontiguousarray(data[tuple(cut)]), node.output[0])
            graph.initializer.append(folded)
            initializers[folded.name] = folded
            graph.node.remove(node)
    count = 0
    for node in graph.node:
        if node.op_type != "Einsum" or len(initializers.get(node.input[1], helper.TensorProto()).dims) != 2:
            continue
        (equation,) = [a.s.decode() for a in node.attribute if a.name == "equation"]
        terms, out = equation.replace(" ", "").split("->")
        left, right = terms.split(",")
        if ("." in terms or left[-1] != right[0] or out != left[:-1] + right[1]
                or len(set(left + right)) != len(left) + 1):
            continue
        node.CopyFrom(helper.make_node("MatMul", list(node.input), list(node.output), name=node.name))
        count += 1
    used = set()
    for node in graph.node:  # and in any subgraph of a node (If, Loop, Scan)
        used.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                used.update(name for inner in sub.node for name in inner.input)
    for tensor in [t for t in graph.initializer if t.name not in used]:  # a sliced kernel's whole is no longer read
        graph.initializer.remove(tensor)
    return count


def check_onnx(artifact, onnx_artifact, seed: int = 0) -> None:
    """ONNX Runtime gives the jax.export function's outputs within `ONNX_TOLERANCE` on random token arrays:
    every bucket, random lengths up to each bucket, batches of 1 to 9 rows."""
    rng = np.random.default_rng(seed)
    special, vocab = artifact.manifest["special"], artifact.tokenizer.get_vocab_size()
    worst = 0.0
    for t in artifact.buckets:
        n = int(rng.integers(1, 10))
        lengths = rng.integers(1, t + 1, n)
        lengths[0] = t  # one row fills the bucket
        mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
        ids = np.where(mask > 0, rng.integers(0, vocab, (n, t)), special["pad"]).astype(np.int32)
        ids[:, 0] = special["cls"] if special["cls"] is not None else ids[:, 0]
        types = np.zeros_like(ids)
        arrays = dict(zip(CLASSIFY_INPUTS, (ids, mask, types)))
        for ours, theirs in zip(artifact.run(arrays), onnx_artifact.run(arrays)):
            keep = np.abs(ours) < 1e30  # a reader's padding logits are the float32 minimum in both
            worst = max(worst, float(np.max(np.abs(np.where(keep, ours - theirs, 0.0)))))
    if not worst <= ONNX_TOLERANCE:
        raise UserError(f"--format onnx: ONNX Runtime differs from the jax.export function by {worst:.2e} "
                        f"(> {ONNX_TOLERANCE}) on random token arrays; export with --format jax.")


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None

