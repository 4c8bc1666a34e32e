"""Every family through every method, from the command line, on tiny masked-LM checkpoints saved by
transformers: pretrain (the saved MLM head reloads in transformers with the same logits), a cloze prompt on
the pretrained run, adversarial training, a 2-member ensemble, a temperature sweep, and export -> serve (the
server's probabilities equal the run's through `inference.load`). BERT's matrix is the rest of the suite;
cross-family distillation is in tests/test_families.py."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import Server, overrides
from test_families import DEBERTA, MODERN, SENTENCES, TINY, bpe, hf  # noqa: F401 - bpe is a fixture

from jaxopt_llm import cli, inference, models
from jaxopt_llm.serving.artifact import Artifact

FAMILIES = {"roberta": "RobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM",
            "electra": "ElectraForMaskedLM", "deberta-v3": "DebertaV2ForMaskedLM",
            "modernbert": "ModernBertForMaskedLM"}


def masked_lm(family: str, folder, tokenizer):
    torch.manual_seed(21)
    if family == "deberta-v3":
        model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**{**TINY, **DEBERTA["v3"]}))
    elif family == "modernbert":
        model = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**MODERN))
    else:
        model = hf(family, "masked-lm", seed=21)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_takes_every_family(family, bpe, setup, tmp_path, capsys):  # noqa: F811
    masked_lm(family, tmp_path / "hf", bpe)
    base = overrides(setup, **{"model.name_or_path": tmp_path / "hf", "train.steps": 2, "data.max_length": 24})

    cli.main(["pretrain", "--workdir", str(tmp_path / "mlm"), *base])
    config = json.loads((tmp_path / "mlm" / "model" / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family]]
    reloaded = getattr(transformers, FAMILIES[family]).from_pretrained(tmp_path / "mlm" / "model").eval()
    enc = bpe(SENTENCES[:3], padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    ours = np.asarray(models.from_pretrained(tmp_path / "mlm" / "model", "masked-lm")(ids, attention_mask=mask))
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask > 0], theirs[mask > 0], atol=1e-4)

    on_mlm = overrides(setup, **{"model.name_or_path": tmp_path / "mlm", "train.steps": 2, "data.max_length": 24})
    cli.main(["prompt", "--workdir", str(tmp_path / "prompt"), *on_mlm, "prompt.pattern={text} It was [MASK].",
              "prompt.verbalizer=negative=bad;neutral=okay;positive=great"])
    cli.main(["adversarial", "--workdir", str(tmp_path / "adv"), *base, "adversarial.epsilon=0.01"])
    cli.main(["finetune", "--workdir", str(tmp_path / "ens"), *base, "method=ensemble", "ensemble.members=2"])
    for run, kind in (("prompt", "prompt"), ("adv", "classifier"), ("ens", "ensemble")):
        model = inference.load(tmp_path / run)
        assert (model.kind, model.max_length) == (kind, 24)
        probs = model.probs(SENTENCES)
        assert probs.shape == (len(SENTENCES), 3) and np.allclose(probs.sum(-1), 1, atol=1e-5)

    capsys.readouterr()
    cli.main(["sweep", "eval", "--model", str(tmp_path / "adv"), "--data", str(setup / "tweets.csv"),
              "data.label_column=sentiment", "temperature=1,2"])
    assert "2 temperature(s)" in capsys.readouterr().out

    cli.main(["export", str(tmp_path / "adv"), "--out", str(tmp_path / "art")])
    server = Server(Artifact.load(tmp_path / "art"))
    try:
        texts = SENTENCES + [" ".join(SENTENCES)]  # the last longer than the run's 24 tokens
        np.testing.assert_allclose(server.probs(texts), inference.load(tmp_path / "adv").probs(texts), atol=1e-5)
    finally:
        server.close()
