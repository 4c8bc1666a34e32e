"""Hugging Face checkpoints in and out: round trips through transformers and every documented failure."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from conftest import HF_CLASSES, hf_model, torch_output
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxopt_llm.models import bert
from jaxopt_llm.models.bert import CheckpointError, CheckpointWarning


def params_of(model):
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_round_trip_through_transformers(task, hf_dirs, batch, tmp_path):
    ids, mask, types = batch
    ours = bert.from_pretrained(hf_dirs[task], task)
    bert.save_pretrained(ours, tmp_path)
    cls = getattr(transformers, HF_CLASSES[task])
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    before = torch_output(hf_model(task), task, ids, mask, types)
    after = torch_output(reloaded.eval(), task, ids, mask, types)
    pairs = task in ("pretraining", "question-answering")  # two outputs
    for b, a in zip(before if pairs else [before], after if pairs else [after]):
        np.testing.assert_array_equal(a, b)  # HF -> ours -> HF moves numbers without arithmetic
    again = params_of(bert.from_pretrained(tmp_path, task))
    first = params_of(ours)
    assert again.keys() == first.keys()
    for path in first:
        np.testing.assert_array_equal(again[path], first[path])
    assert not list(tmp_path.glob(".tmp-*"))


def test_saved_config_round_trips(hf_dirs, tmp_path):
    ours = bert.from_pretrained(hf_dirs["sequence-classification"], "sequence-classification")
    bert.save_pretrained(ours, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert bert.BertConfig.from_hf_config(saved) == ours.config


def test_head_missing_is_fresh_and_warned_once(hf_dirs, batch):
    ids, mask, types = batch
    with pytest.warns(CheckpointWarning) as record:
        model = bert.from_pretrained(hf_dirs["base"], "masked-lm")
    messages = [str(r.message) for r in record if r.category is CheckpointWarning]
    missing = [m for m in messages if "freshly initialised" in m]
    assert len(missing) == 1 and "mlm.transform.kernel" in missing[0] and "mlm.bias" in missing[0]
    unused = [m for m in messages if "not used" in m]
    assert len(unused) == 1 and "pooler.dense.weight" in unused[0]  # masked-lm has no pooler
    hidden_ref = torch_output(hf_model("base"), "base", ids, mask, types)
    hidden = model.encode(model.embed(ids), mask, types)
    np.testing.assert_allclose(np.asarray(hidden), hidden_ref, atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(model(ids, mask, types))).all()


def test_extra_keys_are_listed(hf_dirs):
    with pytest.warns(CheckpointWarning, match=r"cls\.seq_relationship\.weight"):
        bert.from_pretrained(hf_dirs["pretraining"], "base")


def copy_with(src, dst, edit):
    """Copy a checkpoint folder, passing its tensors through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors = edit(load_file(dst / "model.safetensors"))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_legacy_gamma_beta_names(hf_dirs, tmp_path, batch):
    def rename(t):
        return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                for k, v in t.items()}

    legacy = copy_with(hf_dirs["masked-lm"], tmp_path / "legacy", rename)
    assert any(k.endswith("gamma") for k in load_file(legacy / "model.safetensors"))
    ids, mask, types = batch
    np.testing.assert_array_equal(np.asarray(bert.from_pretrained(legacy, "masked-lm")(ids, mask, types)),
                                  np.asarray(bert.from_pretrained(hf_dirs["masked-lm"], "masked-lm")(ids, mask, types)))


def test_every_shape_mismatch_in_one_error(hf_dirs, tmp_path):
    def break_two(t):
        t["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((41, 24), np.float32)
        t["classifier.bias"] = np.zeros((7,), np.float32)
        return t

    bad = copy_with(hf_dirs["sequence-classification"], tmp_path / "bad", break_two)
    with pytest.raises(CheckpointError) as err:
        bert.from_pretrained(bad, "sequence-classification")
    text = str(err.value)
    assert "2 tensor(s)" in text
    assert "bert.encoder.layer.1.intermediate.dense.weight: checkpoint (41, 24), model expects (40, 24)" in text
    assert "classifier.bias: checkpoint (7,), model expects (3,)" in text


def test_num_labels_mismatch_names_the_fix(hf_dirs):
    with pytest.raises(CheckpointError, match="num_labels"):
        bert.from_pretrained(hf_dirs["sequence-classification"], "sequence-classification", num_labels=5)


def test_missing_encoder_tensor_is_an_error(hf_dirs, tmp_path):
    def drop(t):
        del t["encoder.layer.1.attention.self.key.weight"]
        return t

    bad = copy_with(hf_dirs["base"], tmp_path / "bad", drop)
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.qkv\.kernel"):
        bert.from_pretrained(bad)


def test_pytorch_bin_with_tied_decoder(hf_dirs, tmp_path, batch):
    model = hf_model("masked-lm")
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(hf_dirs["masked-lm"] / "config.json", folder)
    state = model.state_dict()
    assert "cls.predictions.decoder.weight" in state  # the tied copy is present in this format
    torch.save(state, folder / "pytorch_model.bin")
    ids, mask, types = batch
    ours = bert.from_pretrained(folder, "masked-lm")(ids, mask, types)
    np.testing.assert_allclose(np.asarray(ours), torch_output(model, "masked-lm", ids, mask, types),
                               atol=1e-5, rtol=0)


def test_sharded_safetensors(tmp_path, batch):
    model = hf_model("pretraining")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids, mask, types = batch
    mlm, nsp = bert.from_pretrained(tmp_path, "pretraining")(ids, mask, types)
    ref_mlm, ref_nsp = torch_output(model, "pretraining", ids, mask, types)
    np.testing.assert_allclose(np.asarray(mlm), ref_mlm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(nsp), ref_nsp, atol=1e-5, rtol=0)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        bert.from_pretrained(tmp_path / "nope")


def test_hub_id_offline_without_cache():
    with pytest.raises(CheckpointError, match=r"'no-such-org/bert-tiny'.*local folder"):
        bert.from_pretrained("no-such-org/bert-tiny")


def test_folder_without_weights(hf_dirs, tmp_path):
    shutil.copy(hf_dirs["base"] / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        bert.from_pretrained(tmp_path)


def test_folder_without_config(hf_dirs, tmp_path):
    shutil.copy(hf_dirs["base"] / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        bert.from_pretrained(tmp_path)


def test_unknown_task(hf_dirs):
    with pytest.raises(CheckpointError, match="task='summarization'"):
        bert.from_pretrained(hf_dirs["base"], "summarization")


def test_bf16_params_load(hf_dirs, batch):
    ids, mask, types = batch
    model = bert.from_pretrained(hf_dirs["masked-lm"], "masked-lm", dtype="bfloat16", param_dtype="bfloat16")
    assert model.layers[0].attention.qkv.kernel[...].dtype == np.dtype("bfloat16")
    logits = np.asarray(model(ids, mask, types))
    assert logits.dtype == np.float32
    ref = torch_output(hf_model("masked-lm"), "masked-lm", ids, mask, types)
    assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()  # bf16 rounding, not a wrong model
