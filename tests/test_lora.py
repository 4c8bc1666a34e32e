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
            a, b = (adapter[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
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


def test_an_adapter_ensemble_step_equals_single_adapter_steps_over_one_base(tmp_path):
    import jax
    import optax
    from conftest import hf_model, make_batch, task_for

    from jaxopt_llm import state as state_lib
    from jaxopt_llm.models import bert
    from jaxopt_llm.recipes import Context
    from jaxopt_llm.steps import ensemble, lora

    hf_model("sequence-classification", hidden_dropout_prob=0.1).save_pretrained(tmp_path)  # dropout on
    task = task_for("sequence-classification")
    tx = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(0.5))
    ctx = Context(task=task, tx=tx, seed=0, model=str(tmp_path),
                  load=lambda ref, head=None, seed=0: bert.from_pretrained(ref, "sequence-classification", seed=seed))
    members = 2
    recipe = lora.build(ctx, lora.LoraOptions(members=members))
    single = lora.build(ctx, lora.LoraOptions())
    base = single.aux["frozen"]
    assert all(np.array_equal(recipe.aux["frozen"][k], base[k]) for k in base)  # one base, not one per member
    assert all(x.shape[0] == members for x in jax.tree.leaves(recipe.params))  # the member axis: adapters, heads
    step, single_step = jax.jit(recipe.train_step), jax.jit(single.train_step)
    state = state_lib.create(recipe.params, recipe.tx)
    singles = [state_lib.create(jax.tree.map(lambda x: x[i], recipe.params), tx) for i in range(members)]
    key = jax.random.key_data(jax.random.key(5))
    for position in range(2):
        batches = [make_batch(10 * i + position) for i in range(members)]
        state, _ = step(state, {k: np.stack([b[k] for b in batches]) for k in batches[0]}, key, recipe.aux)
        singles = [single_step(s, b, ensemble.member_key(key, i), single.aux)[0]
                   for i, (s, b) in enumerate(zip(singles, batches))]
    for i, one in enumerate(singles):
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[i], state.params)), jax.tree.leaves(one.params)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    heads = [np.asarray(s.params["whole"]["classifier.kernel"]) for s in singles]
    assert not np.allclose(heads[0], heads[1])  # each member its own head


def test_an_adapter_ensemble_run_predicts_as_an_ensemble_of_its_merged_members(setup, tmp_path):
    run = tmp_path / "run"
    cli.main(["lora", "--workdir", str(run), *overrides(setup, **{"train.learning_rate": 1e-2, "lora.members": 2})])
    model = inference.load(run)
    assert model.kind == "ensemble" and len(model.members) == 2
    members = [inference.load(m) for m in model.members]
    np.testing.assert_allclose(model.probs(TEXTS), np.mean([m.probs(TEXTS) for m in members], 0), atol=1e-6)
    labels = json.loads((run / "labels.json").read_text())
    for i, member in enumerate(members):  # each member's adapter, in peft, gives that member's logits
        want, _ = peft_logits(transformers.BertForSequenceClassification, setup / "model", run / "adapters" / str(i),
                              TEXTS, len(labels))
        np.testing.assert_allclose(member.logits(TEXTS), want, atol=1e-5)
    assert json.loads((run / "run.json").read_text())["train_step_compiles"] == 1


def test_an_adapter_ensemble_exports_one_artifact_holding_the_base_once(setup, tmp_path):
    from jaxopt_llm.export import export

    run = tmp_path / "run"
    cli.main(["lora", "--workdir", str(run), *overrides(setup, **{"train.learning_rate": 1e-2, "lora.members": 3})])
    artifact = export(str(run), tmp_path / "artifact", golden_texts=TEXTS)
    served = inference.load(artifact)
    np.testing.assert_allclose(served.probs(TEXTS), inference.load(run).probs(TEXTS), atol=1e-5)
    one_model = (setup / "model" / "model.safetensors").stat().st_size
    weights = (artifact / "weights.safetensors").stat().st_size
    assert weights < 1.2 * one_model  # three members: the base once (a stacked export holds it three times)


def test_a_token_classifier_trains_adapters_that_peft_loads(setup, tmp_path):
    from test_tokens import ner_file

    train = ner_file(tmp_path / "train.conll", 48, 0)
    run = tmp_path / "run"
    cli.main(["lora", "--workdir", str(run), *overrides(setup, **{
        "task": "token-classification", "data.train_file": train, "data.max_length": 24,
        "train.learning_rate": 1e-2})])
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and config["modules_to_save"] == ["classifier"]
    labels = json.loads((run / "labels.json").read_text())
    want, _ = peft_logits(transformers.BertForTokenClassification, setup / "model", run / "adapter", TEXTS,
                          len(labels))
    merged = transformers.BertForTokenClassification.from_pretrained(run / "model").eval()
    enc = transformers.AutoTokenizer.from_pretrained(run / "model")(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(merged(**enc).logits.numpy(), want, atol=1e-5)
