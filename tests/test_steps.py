"""Pure steps: MLM masking, losses against PyTorch, positions-only last layer, and
single-device == jit-sharded == pmap (8 fake CPU devices), compiled once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from conftest import MASK_ID, VOCAB, B, T, hf_model, make_batch, masking, run_backend, task_for
from flax import nnx

from jaxopt_llm import state as state_lib
from jaxopt_llm.metrics import macro_f1
from jaxopt_llm.models import bert
from jaxopt_llm.steps import clean, mlm
from jaxopt_llm.steps.classify import ClassificationTask
from jaxopt_llm.steps.common import mean_metrics

MASKING = masking()


def test_masking_counts_and_never_special():
    batch = make_batch()
    masked, positions, labels, weights = mlm.mask_batch(jax.random.key(0), batch, MASKING)
    masked, positions, labels, weights = map(np.asarray, (masked, positions, labels, weights))
    for r in range(B):
        n = int((batch["special_tokens_mask"][r] == 0).sum())
        expected = min(4, max(1, int(np.round(n * 0.15))))
        chosen = positions[r][weights[r] > 0]
        assert len(chosen) == expected == len(set(chosen.tolist()))
        assert (batch["special_tokens_mask"][r][chosen] == 0).all()
        np.testing.assert_array_equal(labels[r][weights[r] > 0], batch["input_ids"][r][chosen])
        untouched = np.setdiff1d(np.arange(T), chosen)
        np.testing.assert_array_equal(masked[r][untouched], batch["input_ids"][r][untouched])


def test_masking_80_10_10():
    m = mlm.Masking(mask_token_id=MASK_ID, vocab_size=10_000, rate=0.5, max_predictions=T)
    ids = np.tile(np.arange(1000, 1000 + T, dtype=np.int32), (4000, 1))
    batch = {"input_ids": ids, "special_tokens_mask": np.zeros_like(ids), "index": np.arange(4000, dtype=np.int32)}
    masked, positions, labels, weights = map(np.asarray, mlm.mask_batch(jax.random.key(1), batch, m))
    new = np.take_along_axis(masked, positions, 1)[weights > 0]
    old = labels[weights > 0]
    frac_mask, frac_kept = np.mean(new == MASK_ID), np.mean(new == old)
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_kept - 0.1) < 0.01  # 24k draws: 3 sigma < 0.6 %


def test_whole_word_masking_takes_whole_words():
    m = mlm.Masking(mask_token_id=MASK_ID, vocab_size=VOCAB, rate=0.3, max_predictions=T)
    batch = make_batch()
    words = np.where(batch["special_tokens_mask"] == 0, (np.arange(T)[None] - 1) // 2, -1).astype(np.int32)
    batch["word_ids"] = words  # two tokens per word
    _, positions, _, weights = map(np.asarray, mlm.mask_batch(jax.random.key(2), batch, dataclass_replace(m)))
    for r in range(B):
        chosen = set(positions[r][weights[r] > 0].tolist())
        for w in set(words[r][list(chosen)].tolist()):
            members = set(np.flatnonzero(words[r] == w).tolist())
            # every chosen word is whole, except possibly the last one cut by the count
            assert members <= chosen or len(members - chosen) == 1


def dataclass_replace(m):
    import dataclasses

    return dataclasses.replace(m, whole_word=True)


def test_masks_change_with_the_key_and_repeat_with_it():
    batch = make_batch()
    a = np.asarray(mlm.mask_batch(jax.random.key(5), batch, MASKING)[1])
    b = np.asarray(mlm.mask_batch(jax.random.key(5), batch, MASKING)[1])
    c = np.asarray(mlm.mask_batch(jax.random.key(6), batch, MASKING)[1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for task in ("masked-lm", "pretraining", "sequence-classification"):
        d = tmp_path_factory.mktemp(task)
        hf_model(task, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(d)
        out[task] = d
    return out


def test_positions_only_last_layer_equals_gathering(tiny_dirs):
    model = bert.from_pretrained(tiny_dirs["masked-lm"], "masked-lm")
    batch = make_batch()
    positions = np.random.RandomState(3).randint(0, T, (B, 5)).astype(np.int32)
    emb = model.embed(batch["input_ids"])
    full = model.encode(emb, batch["attention_mask"])
    part = model.encode(emb, batch["attention_mask"], output_positions=positions)
    np.testing.assert_allclose(np.asarray(part), np.take_along_axis(np.asarray(full), positions[..., None], 1),
                               atol=2e-6)


def test_mlm_eval_loss_matches_torch(tiny_dirs):
    model = bert.from_pretrained(tiny_dirs["pretraining"], "pretraining")
    graphdef, params = nnx.split(model)
    batch = make_batch()
    metrics = clean.make_eval_step(graphdef, task_for("pretraining"))(params, batch)
    masked, positions, labels, weights = map(np.asarray, mlm.mask_batch(jax.random.key(0), batch, MASKING))
    hf_labels = np.full((B, T), -100)
    for r in range(B):
        hf_labels[r, positions[r][weights[r] > 0]] = labels[r][weights[r] > 0]
    ref = hf_model("pretraining", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(masked), attention_mask=torch.tensor(batch["attention_mask"]),
                  token_type_ids=torch.tensor(batch["token_type_ids"]), labels=torch.tensor(hf_labels),
                  next_sentence_label=torch.tensor(batch["next_sentence_label"].astype(np.int64)))
    means = mean_metrics(metrics)
    assert means["loss"] == pytest.approx(float(out.loss), abs=1e-5)  # HF: MLM mean + NSP mean
    logits = out.prediction_logits.numpy()
    picked = logits[hf_labels != -100].argmax(-1) == hf_labels[hf_labels != -100]
    assert means["mlm_accuracy"] == pytest.approx(picked.mean(), abs=1e-6)


def test_classify_eval_matches_torch(tiny_dirs):
    model = bert.from_pretrained(tiny_dirs["sequence-classification"], "sequence-classification")
    graphdef, params = nnx.split(model)
    batch = make_batch()
    batch["weight"][-3:] = 0  # padding rows of a last eval batch count for nothing
    metrics = clean.make_eval_step(graphdef, ClassificationTask())(params, batch)
    ref = hf_model("sequence-classification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    with torch.no_grad():
        logits = ref(input_ids=torch.tensor(batch["input_ids"][:-3]),
                     attention_mask=torch.tensor(batch["attention_mask"][:-3])).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(batch["labels"][:-3].astype(np.int64)))
    means = mean_metrics({k: v for k, v in metrics.items() if k != "confusion"})
    assert means["loss"] == pytest.approx(float(loss), abs=1e-5)
    assert means["accuracy"] == pytest.approx(float((logits.argmax(-1).numpy() == batch["labels"][:-3]).mean()))
    confusion = np.asarray(metrics["confusion"][0])
    assert confusion.sum() == B - 3
    assert np.trace(confusion) == int((logits.argmax(-1).numpy() == batch["labels"][:-3]).sum())


def run_steps(folder, task, backend, n_devices, fsdp=False, steps=3):
    graphdef, params = nnx.split(bert.from_pretrained(folder, task))
    means, params, compiles = run_backend(lambda tx: clean.make_train_step(graphdef, tx, task_for(task)), params,
                                          backend, n_devices, steps, fsdp)
    return [m["loss"] for m in means], params, compiles


@pytest.mark.parametrize("task", ["pretraining", "sequence-classification"])
def test_single_device_jit_sharded_pmap_agree(tiny_dirs, task):
    assert jax.device_count() == 8
    ref_losses, ref_params, compiles = run_steps(tiny_dirs[task], task, "jit", 1)
    assert compiles == [1, 0, 0]  # one compile per run
    for backend, fsdp in (("jit", False), ("jit", True), ("pmap", False)):
        losses, params, compiles = run_steps(tiny_dirs[task], task, backend, 8, fsdp)
        assert compiles[1:] == [0, 0], backend
        np.testing.assert_allclose(losses, ref_losses, atol=1e-6, rtol=0)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_bf16_compute_keeps_fp32_params_and_loss(tiny_dirs):
    batch = make_batch()
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = bert.from_pretrained(tiny_dirs["sequence-classification"], "sequence-classification", dtype=dtype)
        graphdef, params = nnx.split(model)
        state = state_lib.create(params, optax.sgd(0.1))
        step = clean.make_train_step(graphdef, optax.sgd(0.1), ClassificationTask())
        new, metrics = jax.jit(step)(state, batch, jax.random.key(0))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new.params))
        out[dtype] = mean_metrics(metrics)["loss"]
    assert out["bfloat16"] == pytest.approx(out["float32"], abs=0.05)


def test_regression_eval_matches_torch_mse(tmp_path):
    ref = hf_model("sequence-classification", num_labels=1)
    ref.save_pretrained(tmp_path)
    model = bert.from_pretrained(tmp_path, "sequence-classification")
    graphdef, params = nnx.split(model)
    batch = make_batch()
    batch["labels"] = np.linspace(-1, 1, B).astype(np.float32)
    metrics = clean.make_eval_step(graphdef, ClassificationTask())(params, batch)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                  labels=torch.tensor(batch["labels"]))
    assert mean_metrics(metrics)["loss"] == pytest.approx(float(out.loss), abs=1e-5)


def test_macro_f1_of_a_hand_built_confusion_matrix():
    # [true, predicted]; class 0: tp 5, fp 1, fn 2 -> F1 10/13; class 1: tp 3, fp 2, fn 1 -> 6/9;
    # class 2: tp 0, fp 0, fn 1 -> 0; class 3 never occurs and is left out of the mean
    confusion = np.array([[5, 1, 1, 0], [1, 3, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    assert macro_f1(confusion) == pytest.approx((10 / 13 + 6 / 9 + 0.0) / 3, abs=1e-12)


def test_eval_macro_f1_equals_sklearn_style_count(tiny_dirs):
    model = bert.from_pretrained(tiny_dirs["sequence-classification"], "sequence-classification")
    graphdef, params = nnx.split(model)
    task = ClassificationTask()
    batch = make_batch(3)
    logits = np.asarray(model(batch["input_ids"], attention_mask=batch["attention_mask"],
                              token_type_ids=batch["token_type_ids"]))
    predicted, truth = logits.argmax(-1), batch["labels"]
    f1s = []
    for c in range(3):
        tp = np.sum((predicted == c) & (truth == c))
        denominator = np.sum(predicted == c) + np.sum(truth == c)
        if denominator:
            f1s.append(2 * tp / denominator)
    summary = task.summarize(clean.make_eval_step(graphdef, task)(params, batch))
    assert summary["f1"] == pytest.approx(np.mean(f1s), abs=1e-9)


def test_bench_runs_both_sides_on_a_tiny_config(capsys):
    import json
    import os
    import platform

    from jaxopt_llm import bench

    c = bench.BenchConfig(layers=2, hidden=32, heads=2, ffn=64, vocab=500, batch=4, seq=16, steps=1, warmup=1,
                          max_predictions=3, student_layers=1)
    # each kind of row once: against PyTorch, against a budget of our parts, against N of our steps (the MLM
    # and adversarial rows are these rows' code with another task)
    progress = []
    rows = bench.run(c, ("classify", "distill", "ensemble"), log=progress.append)
    assert [r["row"] for r in rows] == ["train step: classify", "distill 2->1 layers",
                                        "ensemble: one 5-member step, 1 per pass"]
    # a family against its own transformers class: the config renames (distilbert), the extra fields (modernbert)
    families = bench.family_rows(c, ("distilbert", "modernbert"))
    assert [r["row"] for r in families] == ["train step: classify, distilbert", "train step: classify, modernbert"]
    assert all(r["ours"] > 0 and r["reference"] > 0 for r in families)
    assert all(r["ours"] > 0 and r["reference"] > 0 for r in rows)
    # progress: each task as it starts, then its row with the row's own figures, then its time
    expected = []
    for number, (task, r) in enumerate(zip(("classify", "distill", "ensemble"), rows), 1):
        expected += [f"bench: {task} ({number} of 3)",
                     f"  {r['row']}: {r['ours']:.1f} vs {r['reference']:.1f} ms, ratio {r['ratio']:.2f}",
                     f"bench: {task} done in"]
    assert len(progress) == len(expected)
    assert all(line.startswith(want) for line, want in zip(progress, expected)), progress
    bench.print_table(c, rows)  # the table names the CPU it came from, in text and JSON
    lines = capsys.readouterr().out.splitlines()
    cpu = next(line for line in lines if line.startswith("cpu: "))
    assert cpu.endswith(f"{os.cpu_count()} cores") and json.loads(lines[-1])["cpu"] == cpu[len("cpu: "):]
    if platform.system() == "Linux":
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        assert cpu.startswith(f"cpu: {model} (family ")
    with pytest.raises(ValueError, match=r"unknown bench rows \['classfy'\]: choose from classify, mlm"):
        bench.run(c, ("classfy",))
    # this test process keeps a persistent compilation cache (conftest): rows that time compilation refuse it
    with pytest.raises(ValueError, match=r"bench rows \['compile', 'predict'\] time compilation, but JAX's persistent"):
        bench.run(c, ("predict", "compile"))


def test_bench_compile_rows_take_medians_of_interleaved_compiles(monkeypatch):
    """The compile rows' seconds: the median of `compile_rounds` compiles of each program, taken in interleaved
    rounds (unrolled, scanned, scan_unroll, ...), the first round being the programs the step rows time."""
    from jaxopt_llm import bench

    c = bench.BenchConfig(steps=2, compile_rounds=3)
    variant = {(): "unrolled", ("scan_layers",): "scanned", ("scan_layers", "scan_unroll"): "scan_unroll"}
    base = {"unrolled": 20.0, "scanned": 5.0, "scan_unroll": 10.0}
    offsets = [0.0, 3.0, -1.0, 9.0, 2.0, -2.0, 1.0, 4.0, 0.5]  # the samples around each base, in call order
    calls, drift = [], iter(offsets * 3)

    def fake(cfg, layers, **changes):
        assert cfg.batch == 2 and changes.pop("hidden_size") == 64  # model changes reach every program
        name = variant[tuple(sorted(changes))]
        calls.append((name, layers))
        return base[name] / (1 if layers == 8 else 2) + next(drift)

    monkeypatch.setattr(bench, "compile_step",
                        lambda cfg, layers, **ch: bench.CompiledStep(fake(cfg, layers, **ch), lambda: None, None))
    monkeypatch.setattr(bench, "compile_seconds", fake)
    monkeypatch.setattr(bench, "_time_pair", lambda a, b, steps, warmup: (2.0, 1.5))
    progress = []
    rows = bench.compile_rows(c, layers=8, log=progress.append, hidden_size=64)
    deep = [(n, 8) for n in ("unrolled", "scanned", "scan_unroll")]
    assert calls == deep * 3 + [(n, 2) for n in ("unrolled", "scanned", "scan_unroll")] * 3
    # a progress line for each compile, in the order made, with its seconds; one for each timed pair of steps
    compiles = [line for line in progress if line.startswith("  compile ")]
    made = [f"  compile {name}, {layers} layers, round {calls[:i + 1].count((name, layers))} of 3: "
            f"{base[name] / (1 if layers == 8 else 2) + x:.1f} s"
            for i, ((name, layers), x) in enumerate(zip(calls, offsets * 2))]
    assert compiles == made
    assert [line for line in progress if line.startswith("  step ")] == [
        "  step scanned vs unrolled, 8 layers, batch 2: 2000 vs 1500 ms",
        "  step scan_unroll vs unrolled, 8 layers, batch 2: 2000 vs 1500 ms"]
    samples = {}
    for (name, layers), x in zip(calls, offsets * 2):
        samples.setdefault((name, layers), []).append(base[name] / (1 if layers == 8 else 2) + x)
    med = {k: sorted(v)[1] for k, v in samples.items()}
    by_row = {r["row"]: r for r in rows}
    scanned = by_row["compile: BERT-large (8 layers) train step, scanned vs unrolled"]
    assert scanned["ours"] == med["scanned", 8] == 8.0 and scanned["reference"] == med["unrolled", 8] == 21.0
    assert scanned["ratio"] == pytest.approx(21.0 / 8.0)
    assert scanned["samples"] == {"ours": samples["scanned", 8], "reference": samples["unrolled", 8]}
    assert by_row["compile: scan_unroll, 8 vs 2 layers"]["reference"] == med["scan_unroll", 2] == 4.0
    assert by_row["step: BERT-large 2x128, scanned vs unrolled"]["ratio"] == pytest.approx(0.75)
    assert len(rows) == 7
    with pytest.raises(ValueError, match=r"compile_rounds=0 \(--compile-rounds\): the compile rows need at least 1"):
        bench.BenchConfig(compile_rounds=0)


def test_bench_compiles_on_shapes_the_program_it_steps_on_arrays():
    """compile_seconds lowers the train step on shapes only: the same program as on allocated arrays."""
    from jaxopt_llm import bench

    c = bench.BenchConfig(batch=2, seq=16)
    tiny = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 200}
    for changes in ({}, {"scan_layers": True}):
        step, *arrays = bench._large_step(c, 3, False, **tiny, **changes)
        shaped_step, *shapes = bench._large_step(c, 3, True, **tiny, **changes)
        assert not any(isinstance(x, jax.Array) for x in jax.tree.leaves(shapes))
        assert shaped_step.lower(*shapes).as_text() == step.lower(*arrays).as_text()


def _experiment(name: str):
    """experiments/<name>.py as a module (the experiments folder is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_optimizer_bench_script_times_the_same_parameters_on_both_sides(capsys):
    """experiments/optimizer_bench.py on a tiny model: PyTorch's BERT has exactly our parameter count (the
    same shapes are updated), and every optimiser gets a row."""
    script = _experiment("optimizer_bench")
    result = script.main(["--layers", "1", "--hidden", "32", "--vocab", "300", "--steps", "1"])
    assert result["parameters"]["ours"] == result["parameters"]["torch"] > 0
    assert len(result["ms"]) == 4 and all(ms > 0 for ms in result["ms"].values())
    assert capsys.readouterr().out.count(" ms   ours is ") == 4


def test_dropout_bench_script_times_both_mask_generators(capsys):
    """experiments/dropout_bench.py on a tiny model: a step time for each mask generator and one line for it; and
    one BERT-large layer compiled (on shapes: nothing allocated), unrolled and scanned, for each."""
    script = _experiment("dropout_bench")
    result = script.main(["--tasks", "classify", "--layers", "1", "--hidden", "32", "--vocab", "300",
                          "--batch", "4", "--steps", "1", "--compile-layers", "1", "--compile-batch", "1"])
    assert set(result["step_ms"]["classify"]) == {"hash", "threefry"}
    assert all(ms > 0 for ms in result["step_ms"]["classify"].values())
    assert {name: set(s) for name, s in result["compile_s"].items()} == {"unrolled": {"hash", "threefry"},
                                                                          "scanned": {"hash", "threefry"}}
    assert capsys.readouterr().out.count("threefry / hash") == 3


def test_step_profile_script_finds_the_loops_copies_in_the_scanned_step_only():
    """experiments/step_profile.py (run as a script: XLA:CPU traces its operations only with a flag set before JAX
    starts) on a 3-layer tiny model: the scanned step slices its layers out of the stack and writes their
    gradients back, the unrolled one has no dynamic slice; both have forward and backward work."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "experiments" / "step_profile.py"), "--layers", "3",
                          "--batch", "1", "--seq", "16", "--hidden", "64", "--vocab", "200", "--warmup", "1",
                          "--variants", "unrolled,scanned"], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])["variants"]
    for r in result.values():
        assert sum(r["by_kind"].values()) == pytest.approx(r["ops_ms"])
        assert sum(r["by_phase"].values()) == pytest.approx(r["ops_ms"])
        assert r["by_kind"]["matmul"] > 0 and r["by_phase"]["forward"] > 0 and r["by_phase"]["backward"] > 0
    assert result["unrolled"]["by_kind"]["dynamic-slice"] == 0
    assert result["scanned"]["by_kind"]["dynamic-slice"] > 0 and result["scanned"]["by_kind"]["dynamic-update-slice"] > 0


def test_gpu_bench_script_checks_parity_with_pytorch_then_times_both_sides(tmp_path):
    """experiments/gpu_bench.py (the prepared accelerator script) on a tiny float32 config on CPU: both sides
    load one checkpoint, and its pre-timing check measures our logits against PyTorch's."""
    import json

    script = _experiment("gpu_bench")
    tiny = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "500", "--batch", "4",
            "--seq", "16", "--steps", "1", "--warmup", "1", "--dtype", "float32"]
    result = script.main([*tiny, "--peak-tflops", "2", "--predict", "0", "--predict-long", "0",
                          "--json", str(tmp_path / "r.json")])
    assert result["predict"] == []  # off: those rows classify thousands of texts with MiniLM
    assert result["check_max_abs_logit_diff"] < 1e-5
    assert json.loads((tmp_path / "r.json").read_text())["speedup"] == pytest.approx(result["speedup"])
    for side in ("ours", "pytorch"):
        s = result[side]
        assert s["sequences_per_s"] == pytest.approx(4 / (s["ms_per_step"] / 1e3))
        assert s["mfu"] == pytest.approx(s["model_tflop_per_s"] / 2)
    assert script.peak_tflops("NVIDIA H200", "bfloat16", None) == 989.0
    assert script.peak_tflops("cpu", "bfloat16", None) is None
    with pytest.raises(SystemExit):  # argparse: token ids are drawn from 104 upwards
        script.main([*tiny[:8], "--vocab", "100"])
