"""LoRA: runs through the command line on BERT and DistilBERT, their adapters loaded by Hugging Face `peft` onto
the transformers model with the logits of our merged model; every frozen tensor of the merged model is the base
checkpoint's, byte for byte, and each adapted weight is the base's plus alpha / r * B A; adapters trained by the
adversarial and distillation methods; clear errors for settings that cannot work."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, overrides
from safetensors.numpy import load_file

from jaxopt_llm import cli, inference

TEXTS = ["I love this airline", "worst flight ever, lost my bag again and again", "ok", "the crew was lovely"]


def peft_logits(base_cls, base_folder, adapter, texts, num_labels):
    import peft

    base = base_cls.from_pretrained(base_folder, num_labels=num_labels)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    tok = transformers.AutoTokenizer.from_pretrained(base_folder)
    enc = tok(texts, padding=True, return_tensors="pt")
    enc.pop("token_type_ids") if base_cls.__name__.startswith("DistilBert") else None
    with torch.no_grad():
        return model(**enc).logits.numpy(), model


def check_run(run, base_folder, base_cls, prefix, adapted):
    """peft's logits == ours (run folder) == the merged export reloaded by transformers; frozen tensors
    byte-identical to the base; adapted ones the base + alpha / r * B A."""
    labels = json.loads((run / "labels.json").read_text())
    want, peft_model = peft_logits(base_cls, base_folder, run / "adapter", TEXTS, len(labels))
    np.testing.assert_allclose(inference.load(run).logits(TEXTS), want, atol=1e-5)
    merged = base_cls.from_pretrained(run / "model").eval()
    tok = transformers.AutoTokenizer.from_pretrained(run / "model")
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    enc.pop("token_type_ids") if base_cls.__name__.startswith("DistilBert") else None
    with torch.no_grad():
        np.testing.assert_allclose(merged(**enc).logits.numpy(), want, atol=1e-5)
    ours, base = load_file(run / "model" / "model.safetensors"), load_file(base_folder / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    changed = 0
    for key, value in ours.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name not in base:  # the task's head: trained whole, saved in the adapter file
            np.testing.assert_array_equal(adapter[f"base_model.model.{key}"], value)
            continue
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module.rsplit(".", 1)[-1] in adapted:
            a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
            np.testing.assert_allclose(value, base[name] + scale * b @ a, atol=1e-6)
            changed += bool(np.abs(b).max() > 0)
        else:
            assert np.array_equal(value, base[name]), key  # frozen: the base's bytes
    assert changed > 0  # the adapters trained
    return json.loads((run / "run.json").read_text()), json.loads((run / "lora.json").read_text())


def test_a_bert_lora_run_loads_into_peft_with_our_logits_and_leaves_the_base_untouched(setup, tmp_path):
    run = tmp_path / "run"
    cli.main(["lora", "--workdir", str(run), *overrides(setup, **{"train.learning_rate": 1e-2})])
    record, info = check_run(run, setup / "model", transformers.BertForSequenceClassification, "bert.",
                             ("query", "value"))
    assert record["train_step_compiles"] == 1
    h, layers, r = TINY["hidden_size"], TINY["num_hidden_layers"], 8  # 3 labels
    assert info["trainable_parameters"] == layers * 2 * r * (h + h) + (h * 3 + 3)  # adapters + classifier
    state = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert state["modules_to_save"] == ["classifier"] and state["task_type"] == "SEQ_CLS"


def test_a_distilbert_lora_run_trains_its_own_layer_names_and_head(setup, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(setup / "model")
    config = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=48,
                                           max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.DistilBertModel(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run = tmp_path / "run"
    cli.main(["lora", "--workdir", str(run), *overrides(setup, **{"model.name_or_path": tmp_path / "base",
                                                                  "train.learning_rate": 1e-2, "lora.rank": 4})])
    check_run(run, tmp_path / "base", transformers.DistilBertForSequenceClassification, "distilbert.",
              ("q_lin", "v_lin"))
    state = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert state["modules_to_save"] == ["classifier", "pre_classifier"] and state["r"] == 4


def test_adapters_train_under_the_adversarial_and_distillation_methods(setup, tmp_path):
    cli.main(["finetune", "--workdir", str(tmp_path / "teacher"), *overrides(setup)])
    runs = {"adversarial": ["lora.method=adversarial"],
            "distill": ["lora.method=distill", f"distill.teacher={tmp_path / 'teacher'}",
                        f"distill.student={setup / 'model'}"]}
    for name, items in runs.items():
        run = tmp_path / name
        cli.main(["lora", "--workdir", str(run), *overrides(setup, **{"train.learning_rate": 1e-2}), *items])
        check_run(run, setup / "model", transformers.BertForSequenceClassification, "bert.", ("query", "value"))
        assert json.loads((run / "lora.json").read_text())["method"] == name


@pytest.mark.parametrize("item, message", [
    ("lora.dropout=0.1", "lora.dropout=0.1: adapters here live in weight space"),
    ("lora.targets=nothing_here", "lora.targets='nothing_here' names none of the model's linear layers"),
    ("lora.method=ensemble", "lora.method='ensemble': adapters train under clean, adversarial, distill"),
    ("lora.method=distill", "lora.method=distill trains the adapters of a student checkpoint"),
])
def test_bad_lora_settings_are_one_clear_error_and_write_nothing(setup, tmp_path, capsys, item, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lora", "--workdir", str(tmp_path / "run"), *overrides(setup), item])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists()
