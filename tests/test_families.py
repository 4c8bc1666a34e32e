"""Model families: RoBERTa, XLM-RoBERTa, DistilBERT and ELECTRA (with and without the embedding projection)
against transformers' PyTorch classes (tiny random configs saved
with save_pretrained, a byte-level BPE tokenizer trained offline), loaded, predicted, saved back and reloaded
by transformers; a fine-tune through the command line predicts and exports like BERT."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import overrides

from jaxopt_llm import cli, inference, models
from jaxopt_llm.errors import UserError
from jaxopt_llm.serving.artifact import Artifact

SENTENCES = ["the quick brown fox jumps over the lazy dog", "a man is eating food", "what a lovely day it is",
             "the service was slow and the food cold", "love this airline", "worst flight ever, lost my bag"]
TINY = dict(vocab_size=300, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
            max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            initializer_range=0.1)
CLASSES = {"roberta": ("RobertaConfig", "Roberta"), "xlm-roberta": ("XLMRobertaConfig", "XLMRoberta"),
           "distilbert": ("DistilBertConfig", "DistilBert"), "electra": ("ElectraConfig", "Electra"),
           "electra-projected": ("ElectraConfig", "Electra")}
DISTIL_NAMES = {"hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                "intermediate_size": "hidden_dim"}
HEADS = {"base": "Model", "masked-lm": "ForMaskedLM", "sequence-classification": "ForSequenceClassification",
         "token-classification": "ForTokenClassification", "question-answering": "ForQuestionAnswering"}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE of 300 tokens trained here, as a RobertaTokenizer (<s>=0, <pad>=1, </s>=2, <mask>=4)."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("bpe")
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(SENTENCES * 20, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.save_model(str(folder))
    return transformers.RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    """A unigram SentencePiece model trained here on a few hundred sentences, loaded by the two families'
    SentencePiece tokenizer classes from the file names their hub repositories use: {"xlm-roberta": ...,
    "deberta-v2": ...}."""
    import io

    import sentencepiece as spm

    words = " ".join(SENTENCES).replace(",", "").split()
    lines = [" ".join(words[(i * 7) % len(words):][:5 + i % 9]) + f" {i}" for i in range(400)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=80,
                                   model_type="unigram", unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    out = {}
    for family, cls, name in (("xlm-roberta", "XLMRobertaTokenizer", "sentencepiece.bpe.model"),
                              ("deberta-v2", "DebertaV2Tokenizer", "spm.model")):
        folder = tmp_path_factory.mktemp(family)
        (folder / name).write_bytes(buffer.getvalue())
        out[family] = getattr(transformers, cls).from_pretrained(folder)
        assert out[family].vocab_size > 40  # the pieces were read, not an empty vocabulary
    return out


def hf(family: str, task: str, seed: int = 0, **changes):
    config_cls, prefix = CLASSES[family]
    fields = {**TINY, "num_labels": 2 if task == "question-answering" else 3, **changes}
    if family == "distilbert":  # its own names
        fields = {DISTIL_NAMES.get(k, k): v for k, v in fields.items() if k != "type_vocab_size"}
    if family == "electra-projected":  # embeddings narrower than the hidden size: projected; the generator's
        fields.update(embedding_size=12, hidden_act="relu")  # head keeps GELU whatever hidden_act says
    if family.startswith("electra"):
        fields["type_vocab_size"] = 2
    config = getattr(transformers, config_cls)(**fields)
    torch.manual_seed(seed)
    return getattr(transformers, prefix + HEADS[task])(config).eval()


def torch_out(model, task, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if task == "question-answering":  # ours: (start, end), stacked here on the last axis
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
    return out.last_hidden_state.numpy() if task == "base" else out.logits.numpy()


def ours_out(model, ids, mask):
    out = model(ids, attention_mask=mask)
    return np.stack([np.asarray(x) for x in out], -1) if isinstance(out, tuple) else np.asarray(out)


def batch(tokenizer):
    enc = tokenizer(SENTENCES[:4], padding=True)  # rows of different lengths: padding in three of them
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("task", list(HEADS))
def test_parity_and_round_trip_with_transformers(family, task, bpe, tmp_path):
    ref = hf(family, task)
    ref.save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    ids, mask = batch(bpe)
    assert (mask == 0).any()
    ours = models.from_pretrained(tmp_path / "hf", task)
    assert type(ours).__name__ == CLASSES[family][1]
    assert models.of_model(ours).model_type == family.replace("-projected", "")
    np.testing.assert_allclose(ours_out(ours, ids, mask), torch_out(ref, task, ids, mask),
                               atol=1e-5)
    models.save_pretrained(ours, tmp_path / "ours")  # back to transformers, which reloads it exactly
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == family.replace("-projected", "")
    assert config["architectures"] == [CLASSES[family][1] + HEADS[task]]
    again = getattr(transformers, CLASSES[family][1] + HEADS[task]).from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_out(again, task, ids, mask), torch_out(ref, task, ids, mask), atol=1e-6)


@pytest.mark.parametrize("family", ["electra", "electra-projected"])
def test_electra_discriminator_head_parity_and_round_trip(family, bpe, tmp_path):
    config_cls, _ = CLASSES[family]
    fields = {**TINY, "type_vocab_size": 2}
    if family == "electra-projected":
        fields.update(embedding_size=12, hidden_act="relu")
    torch.manual_seed(11)
    ref = transformers.ElectraForPreTraining(transformers.ElectraConfig(**fields)).eval()
    ref.save_pretrained(tmp_path / "hf")
    ids, mask = batch(bpe)
    ours = models.from_pretrained(tmp_path / "hf", "replaced-token-detection")
    expected = torch_out(ref, "replaced-token-detection", ids, mask)
    assert expected.shape == ids.shape
    np.testing.assert_allclose(np.asarray(ours(ids, attention_mask=mask)), expected, atol=1e-5)
    models.save_pretrained(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["architectures"] == ["ElectraForPreTraining"]
    again = transformers.ElectraForPreTraining.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_out(again, "rtd", ids, mask), expected, atol=1e-6)


def test_roberta_cuts_texts_at_its_usable_positions_and_predicts_as_transformers(bpe, tmp_path):
    ref = hf("roberta", "sequence-classification", seed=1)
    ref.save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    model = inference.load(tmp_path / "hf")
    assert model.kind == "classifier" and model.max_length == TINY["max_position_embeddings"] - 2
    texts = [" ".join(SENTENCES)] + SENTENCES[:3]  # the first longer than the 38 tokens the positions allow
    enc = bpe(texts, truncation=True, max_length=38, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 38
    with torch.no_grad():
        expected = ref(**enc).logits.softmax(-1).numpy()
    np.testing.assert_allclose(model.probs(texts), expected, atol=1e-5)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra-projected"])
def test_a_finetune_of_another_family_runs_predicts_and_exports(family, bpe, setup, tmp_path, capsys):
    hf(family, "base", seed=2).save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    finetune_predict_export(getattr(transformers, CLASSES[family][1] + HEADS["sequence-classification"]), bpe,
                            setup, tmp_path, capsys)


def finetune_predict_export(cls, bpe, setup, tmp_path, capsys):
    """Fine-tune the model in tmp_path/hf through the command line; `predict` equals transformers' `cls` on the
    saved run, and the exported artifact equals `predict`."""
    items = overrides(setup, **{"model.name_or_path": tmp_path / "hf", "train.steps": 2, "data.max_length": 24})
    cli.main(["finetune", "--workdir", str(tmp_path / "run"), *items])
    capsys.readouterr()
    texts = ["love this airline", " ".join(SENTENCES)]
    cli.main(["predict", "classify", "--model", str(tmp_path / "run"), *texts])
    printed = [json.loads(line)["scores"] for line in capsys.readouterr().out.splitlines()]
    reloaded = cls.from_pretrained(tmp_path / "run" / "model").eval()
    enc = bpe(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(printed, reloaded(**enc).logits.softmax(-1).numpy(), atol=1e-5)
    cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "art")])
    art = Artifact.load(tmp_path / "art")
    assert art.manifest["max_length"] == 24 and art.manifest["special"]["pad"] == bpe.pad_token_id
    np.testing.assert_allclose(art.predict(texts)[0], printed, atol=1e-5)


def test_a_roberta_teacher_distils_into_a_roberta_student(bpe, setup, tmp_path):
    hf("roberta", "sequence-classification", seed=3, id2label={0: "negative", 1: "neutral", 2: "positive"},
       label2id={"negative": 0, "neutral": 1, "positive": 2}).save_pretrained(tmp_path / "teacher")
    bpe.save_pretrained(tmp_path / "teacher")
    items = overrides(setup, **{"model.name_or_path": tmp_path / "teacher", "train.steps": 2, "data.max_length": 24})
    cli.main(["distill", "--workdir", str(tmp_path / "kd"), *items, f"distill.teacher={tmp_path / 'teacher'}",
              "distill.student_layers=1"])
    config = json.loads((tmp_path / "kd" / "model" / "config.json").read_text())
    assert config["model_type"] == "roberta" and config["num_hidden_layers"] == 1
    student = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "kd" / "model").eval()
    ours = inference.load(tmp_path / "kd")
    enc = bpe(SENTENCES[:3], truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(ours.probs(SENTENCES[:3]), student(**enc).logits.softmax(-1).numpy(), atol=1e-5)


def test_a_family_registered_from_outside_trains_predicts_and_exports(setup, tmp_path, capsys, monkeypatch):
    """A toy variant of BERT (its own model_type, config and module classes) registered by this test: the
    package is not changed, and fine-tune, predict, save and export all take it."""
    import dataclasses
    from typing import ClassVar

    from conftest import TINY as BERT_TINY

    from jaxopt_llm.models.bert.modeling import Bert, BertConfig
    from jaxopt_llm.models.bert.params import FAMILY as BERT

    class ToyHF(transformers.BertConfig):
        model_type = "toy-bert"

    @dataclasses.dataclass(frozen=True)
    class ToyConfig(BertConfig):
        MODEL_TYPE: ClassVar[str] = "toy-bert"

        def to_hf_config(self, architectures=()):
            return ToyHF(**super().to_hf_config(architectures).to_dict())

    class ToyBert(Bert):
        pass

    from jaxopt_llm.models import registry

    # the registry is process-wide: the toy family leaves with this test
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    models.register(dataclasses.replace(BERT, model_type="toy-bert", config=ToyConfig, module=ToyBert))
    tok = transformers.AutoTokenizer.from_pretrained(setup / "model")
    ref = transformers.BertForSequenceClassification(transformers.BertConfig(
        **{**BERT_TINY, "vocab_size": tok.vocab_size, "max_position_embeddings": 64, "num_labels": 3}))
    ref.save_pretrained(tmp_path / "toy")
    tok.save_pretrained(tmp_path / "toy")
    config = json.loads((tmp_path / "toy" / "config.json").read_text())
    (tmp_path / "toy" / "config.json").write_text(json.dumps({**config, "model_type": "toy-bert"}))
    assert type(models.from_pretrained(tmp_path / "toy", "sequence-classification")) is ToyBert
    cli.main(["finetune", "--workdir", str(tmp_path / "run"), *overrides(setup, **{
        "model.name_or_path": tmp_path / "toy", "train.steps": 2})])
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["model_type"] == "toy-bert"
    capsys.readouterr()
    cli.main(["predict", "classify", "--model", str(tmp_path / "run"), "love this airline", "lost my bag"])
    printed = [json.loads(line)["scores"] for line in capsys.readouterr().out.splitlines()]
    cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "art")])
    np.testing.assert_allclose(Artifact.load(tmp_path / "art").predict(["love this airline", "lost my bag"])[0],
                               printed, atol=1e-5)


def test_adversarial_ensemble_prompt_and_sweep_take_a_roberta(bpe, setup, tmp_path, capsys):
    hf("roberta", "masked-lm", seed=4).save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    base = overrides(setup, **{"model.name_or_path": tmp_path / "hf", "train.steps": 2, "data.max_length": 24})
    cli.main(["adversarial", "--workdir", str(tmp_path / "adv"), *base, "adversarial.epsilon=0.01"])
    cli.main(["finetune", "--workdir", str(tmp_path / "ens"), *base, "method=ensemble", "ensemble.members=2"])
    cli.main(["prompt", "--workdir", str(tmp_path / "prompt"), *base, "prompt.pattern={text} It was [MASK].",
              "prompt.verbalizer=negative=bad;neutral=okay;positive=great"])
    for run, kind in (("adv", "classifier"), ("ens", "ensemble"), ("prompt", "prompt")):
        model = inference.load(tmp_path / run)
        assert (model.kind, model.max_length) == (kind, 24)
        probs = model.probs(SENTENCES[:3])
        assert probs.shape == (3, 3) and np.allclose(probs.sum(-1), 1, atol=1e-5)
    members = inference.load(tmp_path / "ens").member_probs(SENTENCES[:3])  # each member a RoBERTa
    one = inference.load(tmp_path / "ens" / "members" / "0", max_length=24).probs(SENTENCES[:3])
    np.testing.assert_allclose(members[0], one, atol=1e-5)
    capsys.readouterr()
    cli.main(["sweep", "eval", "--model", str(tmp_path / "adv"), "--data", str(setup / "tweets.csv"),
              "data.label_column=sentiment", "temperature=1,2"])
    assert "2 temperature(s)" in capsys.readouterr().out


DEBERTA = {  # tiny versions of the two configurations in use
    "v3": dict(relative_attention=True, position_buckets=8, max_relative_positions=-1, share_att_key=True,
               pos_att_type="p2c|c2p", position_biased_input=False, norm_rel_ebd="layer_norm", type_vocab_size=0),
    "v2": dict(relative_attention=True, position_buckets=-1, max_relative_positions=16, share_att_key=False,
               pos_att_type="c2p|p2c", position_biased_input=True, norm_rel_ebd="none", type_vocab_size=2,
               embedding_size=12),
}
DEBERTA["v3-lm_predictions"] = {**DEBERTA["v3"], "legacy": False}  # the masked-LM head's other key names
DEBERTA["v2-conv"] = {**DEBERTA["v2"], "conv_kernel_size": 3, "conv_groups": 2, "conv_act": "gelu"}  # xlarge's


@pytest.mark.parametrize(("variant", "task"), [(v, t) for v in DEBERTA for t in HEADS
                                                if v != "v3-lm_predictions" or t == "masked-lm"])  # legacy: MLM keys
def test_deberta_v2_and_v3_parity_and_round_trip(variant, task, bpe, tmp_path):
    fields = {**TINY, "num_labels": 2 if task == "question-answering" else 3, **DEBERTA[variant]}
    config = transformers.DebertaV2Config(**fields)
    torch.manual_seed(5)
    cls = getattr(transformers, "DebertaV2" + HEADS[task])
    ref = cls(config).eval()
    if task == "masked-lm":  # a bias that is not its zero init, so that its key is checked
        head = ref.cls.predictions if config.legacy else ref.lm_predictions.lm_head
        torch.nn.init.normal_(head.bias, std=0.5)
    ref.save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    enc = bpe([" ".join(SENTENCES)[:150]] + SENTENCES[:3], padding=True, truncation=True, max_length=40)
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    assert ids.shape[1] > 2 * DEBERTA["v3"]["position_buckets"]  # distances past the log buckets' linear part
    ours = models.from_pretrained(tmp_path / "hf", task)
    expected = torch_out(ref, task, ids, mask)
    np.testing.assert_allclose(ours_out(ours, ids, mask), expected, atol=1e-5)
    models.save_pretrained(ours, tmp_path / "ours")
    again = cls.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_out(again, task, ids, mask), expected, atol=1e-6)


def test_a_deberta_v3_finetune_runs_predicts_and_exports(sentencepiece, setup, tmp_path, capsys):
    """With a SentencePiece tokenizer, as DeBERTa-v3 has ([CLS] and [PAD] ids not RoBERTa's)."""
    tok = sentencepiece["deberta-v2"]
    torch.manual_seed(6)
    sizes = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    transformers.DebertaV2Model(transformers.DebertaV2Config(**{**TINY, **DEBERTA["v3"], **sizes})).save_pretrained(
        tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    finetune_predict_export(transformers.DebertaV2ForSequenceClassification, tok, setup, tmp_path, capsys)


def test_an_xlm_roberta_with_a_sentencepiece_tokenizer_finetunes_predicts_and_exports(sentencepiece, setup,
                                                                                       tmp_path, capsys):
    tok = sentencepiece["xlm-roberta"]
    hf("xlm-roberta", "base", seed=12, vocab_size=len(tok)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    finetune_predict_export(transformers.XLMRobertaForSequenceClassification, tok, setup, tmp_path, capsys)


MODERN = dict(vocab_size=300, hidden_size=24, intermediate_size=40, num_hidden_layers=4, num_attention_heads=3,
              max_position_embeddings=64, local_attention=8, pad_token_id=1, bos_token_id=0, eos_token_id=2,
              cls_token_id=0, sep_token_id=2, initializer_range=0.1)


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("task", [*HEADS, "sequence-classification-mean"])
def test_modernbert_parity_past_its_local_window_and_round_trip(task, biases, bpe, tmp_path):
    fields = {**MODERN, "num_labels": 2 if task == "question-answering" else 3}
    if biases:
        fields.update(norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True)
    if task.endswith("-mean"):  # mean pooling over the real tokens, as ModernBERT-base's config says
        task, fields["classifier_pooling"] = "sequence-classification", "mean"
    config = transformers.ModernBertConfig(**fields)
    cls = getattr(transformers, "ModernBert" + HEADS[task])
    torch.manual_seed(7)
    ref = cls(config).eval()
    ref.save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    enc = bpe([" ".join(SENTENCES)[:120]] + SENTENCES[:3], padding=True, truncation=True, max_length=64)
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    assert ids.shape[1] > 2 * MODERN["local_attention"]  # the local layers see only part of the row
    ours = models.from_pretrained(tmp_path / "hf", task)
    expected = torch_out(ref, task, ids, mask)
    got = ours_out(ours, ids, mask)
    if task != "sequence-classification":  # padded positions' outputs are the attention kernel's: real tokens
        got, expected = got[mask > 0], expected[mask > 0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    models.save_pretrained(ours, tmp_path / "ours")
    again = cls.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_out(again, task, ids, mask), torch_out(ref, task, ids, mask), atol=1e-6)


def test_a_modernbert_finetune_runs_predicts_and_exports(bpe, setup, tmp_path, capsys):
    torch.manual_seed(8)
    config = transformers.ModernBertConfig(**MODERN, classifier_pooling="mean")  # as ModernBERT-base's
    transformers.ModernBertModel(config).save_pretrained(tmp_path / "hf")
    bpe.save_pretrained(tmp_path / "hf")
    finetune_predict_export(transformers.ModernBertForSequenceClassification, bpe, setup, tmp_path, capsys)


def family_folder(family: str, tmp_path):
    """A tiny random classifier of `family` saved by transformers, without dropout (the comparison is of
    sharding, as for BERT in tests/test_steps.py)."""
    off = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
    if family == "deberta-v3":
        model = transformers.DebertaV2ForSequenceClassification(
            transformers.DebertaV2Config(**{**TINY, "num_labels": 3, **DEBERTA["v3"], **off}))
    elif family == "modernbert":
        model = transformers.ModernBertForSequenceClassification(
            transformers.ModernBertConfig(**{**MODERN, "num_labels": 3}))
    elif family == "distilbert":
        model = hf(family, "sequence-classification", seed=9, dropout=0.0, attention_dropout=0.0,
                   seq_classif_dropout=0.0)
    else:
        model = hf(family, "sequence-classification", seed=9, **off)
    model.save_pretrained(tmp_path / family)
    return tmp_path / family


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra-projected", "deberta-v3", "modernbert"])
def test_every_family_trains_alike_on_one_device_sharded_fsdp_and_pmap(family, tmp_path):
    """Three SGD steps of each family's classifier: jit on 8 devices (data-parallel and FSDP) and pmap give the
    losses and parameters of one device, and the step compiles once."""
    import jax
    from conftest import run_backend, task_for
    from flax import nnx

    from jaxopt_llm.steps import clean

    folder = family_folder(family, tmp_path)

    def run(backend, n, fsdp=False):
        graphdef, params = nnx.split(models.from_pretrained(folder, "sequence-classification"))
        means, params, compiles = run_backend(lambda tx: clean.make_train_step(
            graphdef, tx, task_for("sequence-classification")), params, backend, n, 3, fsdp)
        return [m["loss"] for m in means], params, compiles

    ref_losses, ref_params, compiles = run("jit", 1)
    assert compiles == [1, 0, 0]
    for backend, fsdp in (("jit", False), ("jit", True), ("pmap", False)):
        losses, params, compiles = run(backend, 8, fsdp)
        assert compiles[1:] == [0, 0], backend
        np.testing.assert_allclose(losses, ref_losses, atol=1e-6, rtol=0)
        # parameters to float32 rounding of sums split over shards: DeBERTa's relative-position gradients add
        # t^2 gathered terms per slot (differences up to 1.2e-5 relative after 3 steps at lr 0.5, where
        # embeddings reach 50); the losses, which a sharding error moves (dropout masks drawn per shard moved
        # them by 0.1), agree to 1e-6
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=3e-5)


@pytest.mark.parametrize("t", [9, 16, 37])
def test_modernbert_banded_local_attention_equals_the_masked_full_matrix(t):
    """The band-only computation against the full score matrix masked to |q - k| <= half, at lengths that are
    and are not multiples of the block, with padding; padded queries excluded (their rows are undefined)."""
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.models.modernbert.modeling import banded_attention

    half, h, k = 4, 2, 5
    q, kk, v = (jax.random.normal(jax.random.key(i), (3, t, h, k)) for i in range(3))
    lengths = np.array([t, t - 3, 5])
    keep = np.arange(t)[None] < lengths[:, None]
    got = banded_attention(q, kk, v, jnp.asarray(keep), half, 0.0, None, True, "hash")
    scores = np.einsum("bqhk,bshk->bhqs", q, kk) / np.sqrt(k)
    band = np.abs(np.arange(t)[:, None] - np.arange(t)[None]) <= half
    scores = np.where(keep[:, None, None, :] & band[None, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhqs,bshk->bqhk", probs / probs.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(got)[keep], want[keep], atol=1e-5)


def test_a_bert_teacher_distils_into_a_distilbert_student_of_its_vocabulary(bpe, setup, tmp_path, capsys):
    """Cross-family distillation (BERT -> DistilBERT, sharing the teacher's WordPiece vocabulary): the run's
    model is a DistilBERT that transformers reloads and that predicts as `inference.load` does; a student
    whose tokenizer is another is refused before any training."""
    tok = transformers.AutoTokenizer.from_pretrained(setup / "model")
    student = transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=tok.vocab_size, dim=24, n_layers=1, n_heads=3, hidden_dim=40, max_position_embeddings=64))
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    items = overrides(setup, **{"train.steps": 2, "data.max_length": 24})
    cli.main(["distill", "--workdir", str(tmp_path / "kd"), *items, f"distill.teacher={setup / 'model'}",
              f"distill.student={tmp_path / 'student'}", "distill.hidden_weight=1.0"])
    config = json.loads((tmp_path / "kd" / "model" / "config.json").read_text())
    assert config["model_type"] == "distilbert" and config["n_layers"] == 1
    reloaded = transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path / "kd" / "model").eval()
    enc = tok(SENTENCES[:3], truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reloaded(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.softmax(-1)
    np.testing.assert_allclose(inference.load(tmp_path / "kd").probs(SENTENCES[:3]), expected.numpy(), atol=1e-5)

    hf("roberta", "base").save_pretrained(tmp_path / "other")
    bpe.save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--workdir", str(tmp_path / "bad"), *items, f"distill.teacher={setup / 'model'}",
                  f"distill.student={tmp_path / 'other'}"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad" / "model").exists()
    assert "another vocabulary than the teacher" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["deberta-v2", "deberta-v3", "modernbert"])
def test_packed_rows_give_each_block_what_it_gives_alone(family, bpe, tmp_path):
    """Two texts packed side by side in one row (block-diagonal mask, positions restarting per block, as the
    prompt task packs its variants) against each text run alone (the path compared with transformers)."""
    if family == "modernbert":
        ref = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**MODERN))
    else:
        ref = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**{**TINY, **DEBERTA[family[-2:]]}))
    ref.save_pretrained(tmp_path / "hf")
    model = models.from_pretrained(tmp_path / "hf", "base")
    t = 24
    texts = [" ".join(SENTENCES)[:90], SENTENCES[1]]  # the first past ModernBERT's local window
    alone = [np.asarray(bpe(x, truncation=True, max_length=t)["input_ids"], np.int32) for x in texts]
    ids = np.full((1, 2 * t), bpe.pad_token_id, np.int32)
    mask = np.zeros((1, 2 * t, 2 * t), np.int32)
    positions = np.zeros((1, 2 * t), np.int32)
    for j, a in enumerate(alone):
        ids[0, j * t:j * t + len(a)] = a
        mask[0, j * t:j * t + len(a), j * t:j * t + len(a)] = 1
        positions[0, j * t:(j + 1) * t] = np.arange(t)
    packed = np.asarray(model.encode(model.embed(ids), mask, None, positions))
    for j, a in enumerate(alone):
        single = np.asarray(model.encode(model.embed(a[None]), np.ones((1, len(a)), np.int32)))
        np.testing.assert_allclose(packed[0, j * t:j * t + len(a)], single[0], atol=1e-5)


def test_modernbert_unpadded_execution_equals_transformers_and_the_padded_path(bpe, tmp_path):
    """Layers on the real tokens only (`unpad`): outputs at real tokens equal transformers'; with dropout on, the
    loss and gradients equal the padded path's (the same masks); a batch fuller than the buffer takes the padded
    path inside the same compiled step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    fields = {**MODERN, "num_labels": 3, "classifier_pooling": "mean"}
    torch.manual_seed(11)
    ref = transformers.ModernBertForSequenceClassification(transformers.ModernBertConfig(**fields)).eval()
    ref.save_pretrained(tmp_path / "hf")
    enc = bpe([" ".join(SENTENCES)[:120]] + SENTENCES[:3], padding="max_length", truncation=True, max_length=64)
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    assert mask.sum() <= 128 and mask[0].all()  # the buffer (half the slots) holds them; one row past the window
    unpadded = models.from_pretrained(tmp_path / "hf", "sequence-classification", unpad=0.5)
    assert unpadded.capacity(*ids.shape) == 128
    np.testing.assert_allclose(ours_out(unpadded, ids, mask), torch_out(ref, "sequence-classification", ids, mask),
                               atol=1e-5)
    hidden = np.asarray(unpadded.encode(unpadded.embed(ids), mask))
    np.testing.assert_allclose(hidden[mask > 0], ref.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(
        mask)).last_hidden_state.detach().numpy()[mask > 0], atol=1e-5)
    assert not hidden[mask == 0].any()  # padding's rows are zeros

    def loss_and_grads(model, ids, mask):
        graphdef, params = nnx.split(model)

        def loss(params, ids, mask, key):
            logits = nnx.merge(graphdef, params)(ids, mask, deterministic=False, dropout_key=key)
            return jnp.sum(logits ** 2)

        fn = jax.jit(jax.value_and_grad(loss))
        return fn, params

    changes = {"hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.1, "classifier_dropout": 0.0}
    padded = models.from_pretrained(tmp_path / "hf", "sequence-classification", **changes)
    unpadded = models.from_pretrained(tmp_path / "hf", "sequence-classification", unpad=0.5, **changes)
    key = jax.random.key(3)
    full = np.ones_like(mask)  # 256 real tokens: past the 128-row buffer
    for use_mask in (mask, full):
        (want, want_grads), (got, got_grads) = (fn(params, ids, use_mask, key) for fn, params in
                                                (loss_and_grads(m, ids, use_mask) for m in (padded, unpadded)))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    fn, params = loss_and_grads(unpadded, ids, mask)
    fn(params, ids, mask, key), fn(params, ids, full, key)
    assert fn._cache_size() == 1  # one program holds both paths
    hf("roberta", "base").save_pretrained(tmp_path / "roberta")
    with pytest.raises(UserError, match="unpad: not a setting of a roberta"):
        models.from_pretrained(tmp_path / "roberta", unpad=0.5)


@pytest.mark.parametrize("t, per_query", [(128, False), (131, True), (40, False)])
def test_attention_one_head_at_a_time_equals_the_softmax_reference(t, per_query):
    """`layers.attention` on CPU (from 128 keys a loop over heads, below it the fused call) against numpy, with
    padded keys and a mask per key or per query (packed rows)."""
    import jax

    from jaxopt_llm.models.layers import attention

    b, h, k = 3, 4, 8
    q, kk, v = (np.asarray(jax.random.normal(jax.random.key(i), (b, t, h, k))) for i in range(3))
    keep = np.arange(t)[None] < np.array([t, t - 9, 40])[:, None]  # (b, s)
    keep = (keep[:, None, :] & keep[:, :, None]) if per_query else keep[:, None, :]  # (b, q | 1, s)
    bias = np.where(keep, 0.0, np.finfo(np.float32).min)[:, None].astype(np.float32)
    got = np.asarray(attention(q, kk, v, bias, 0.3))
    scores = np.einsum("bqhk,bshk->bhqs", q, kk) * 0.3 + bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhqs,bshk->bqhk", probs / probs.sum(-1, keepdims=True), v)
    rows = keep.any(-1) if per_query else np.ones((b, t), bool)  # a fully masked query row is undefined
    np.testing.assert_allclose(got[rows], want[rows], atol=1e-5)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra-projected", "deberta-v3", "modernbert"])
def test_onnx_export_equals_transformers_on_random_lengths_or_is_refused_whole(family, bpe, tmp_path):
    """ONNX Runtime on the exported model.onnx against the PyTorch classifier, texts past the 32-token cut;
    DeBERTa's relative positions and ModernBERT's local window are built for a known length, which the
    converter's symbolic sequence axis is not: one error, nothing written."""
    from jaxopt_llm.export import export

    folder = family_folder(family, tmp_path)
    bpe.save_pretrained(folder)
    if family in ("deberta-v3", "modernbert"):
        with pytest.raises(UserError, match="jax2onnx could not convert this classifier.*--format jax"):
            export(str(folder), tmp_path / "art", format="onnx", max_length=32)
        assert sorted(p.name for p in tmp_path.iterdir()) == [family]
        return
    export(str(folder), tmp_path / "art", format="onnx", max_length=32)
    rng = np.random.default_rng(0)
    words = " ".join(SENTENCES).replace(",", "").split()
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(24)]
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = bpe(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 32  # some texts were cut
    with torch.no_grad():
        expected = torch.softmax(reference(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits,
                                 -1).numpy()
    art = Artifact.load(tmp_path / "art", backend="onnxruntime")
    np.testing.assert_allclose(art.predict(texts, max_batch=5)[0], expected, atol=1e-4)
