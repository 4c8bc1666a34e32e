"""fill-mask / classify / embed against PyTorch, fixed shapes (no recompiles), and the CLI."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY

from jaxopt_llm import cli, inference
from jaxopt_llm.assets import minilm_path
from jaxopt_llm.packing import LENGTH_BUCKETS, bucket
from jaxopt_llm.predict import compile_count

TEXTS = ["The [MASK] runs through the park.", "Paris is the [MASK] of France.",
         "I [MASK] this movie so much, it was [MASK]!"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def save_tiny(task, folder, tokenizer, **changes):
    """A random tiny HF model with the MiniLM vocabulary, plus its tokenizer, in `folder`."""
    config = transformers.BertConfig(**{**TINY, "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 64,
                                        **changes})
    torch.manual_seed(1)
    model = getattr(transformers, task)(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("mlm")
    return folder, save_tiny("BertForMaskedLM", folder, tokenizer)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("cls")
    model = save_tiny("BertForSequenceClassification", folder, tokenizer, num_labels=3,
                      id2label={0: "negative", 1: "neutral", 2: "positive"},
                      label2id={"negative": 0, "neutral": 1, "positive": 2})
    return folder, model


def torch_topk(model, tokenizer, text, k):
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0].softmax(-1)
    where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[:, 0]
    top = probs[where].topk(k)
    return top.indices.numpy(), top.values.numpy()


def test_fill_mask_matches_torch_topk(mlm, tokenizer):
    folder, ref = mlm
    out = inference.load(folder, kind="masked-lm").fill_mask(TEXTS, top_k=5)
    for text, preds in zip(TEXTS, out):
        ids, scores = torch_topk(ref, tokenizer, text, 5)
        per_mask = preds if isinstance(preds[0], list) else [preds]
        assert len(per_mask) == text.count("[MASK]")
        for j, p in enumerate(per_mask):
            assert [x["token_id"] for x in p] == ids[j].tolist()
            np.testing.assert_allclose([x["score"] for x in p], scores[j], atol=1e-6)
            assert p[0]["token"] == tokenizer.convert_ids_to_tokens(int(ids[j][0]))


def test_new_batch_same_bucket_does_not_recompile(mlm):
    folder, _ = mlm
    predictor = inference.load(folder, kind="masked-lm", batch_size=4)
    predictor.fill_mask(["A [MASK] day.", "Hello [MASK]."], top_k=3)
    before = compile_count()
    predictor.fill_mask(["The [MASK] is blue today.", "We [MASK] home."], top_k=3)
    assert compile_count() == before


def test_length_buckets_pad_at_most_7_tokens_up_to_64_and_a_quarter_beyond():
    for n in range(1, 513):
        padded = bucket(n, LENGTH_BUCKETS)
        assert n <= padded and (padded - n <= 7 if n <= 64 else padded <= 1.25 * n), (n, padded)


def test_fill_mask_needs_a_mask(mlm):
    folder, _ = mlm
    with pytest.raises(ValueError, match=r"'no mask here' has no \[MASK\]"):
        inference.load(folder, kind="masked-lm").fill_mask(["no mask here"])


def test_classify_matches_torch(classifier, tokenizer):
    folder, ref = classifier
    texts = ["great phone, love it", "worst service ever", "it is a car.", "meh"] * 3
    out = inference.load(folder, kind="classifier", batch_size=8).classify(texts)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = ref(**enc).logits.softmax(-1).numpy()
    np.testing.assert_allclose([o["scores"] for o in out], probs, atol=1e-5)
    names = ["negative", "neutral", "positive"]
    assert [o["label"] for o in out] == [names[i] for i in probs.argmax(-1)]


def test_embed_matches_sentence_transformers_recipe():
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    folder = minilm_path()
    ours = inference.load(folder).embed(texts)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = transformers.BertModel.from_pretrained(folder)(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_cli_fill_mask_json_lines(mlm, tokenizer, capsys):
    folder, ref = mlm
    cli.main(["predict", "fill-mask", "--model", str(folder), "--top-k", "3", TEXTS[0]])
    row = json.loads(capsys.readouterr().out.strip())
    assert row["text"] == TEXTS[0]
    assert [p["token_id"] for p in row["predictions"]] == torch_topk(ref, tokenizer, TEXTS[0], 3)[0][0].tolist()
    assert set(row["predictions"][0]) >= {"token", "score"}


def test_cli_classify_file(classifier, tmp_path, capsys):
    folder, _ = classifier
    file = tmp_path / "texts.txt"
    file.write_text("good\n\nbad day\n")
    cli.main(["predict", "classify", "--model", str(folder), "--file", str(file)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["good", "bad day"]
    assert all(r["label"] in ("negative", "neutral", "positive") and len(r["scores"]) == 3 for r in rows)


def test_cli_bad_model_path_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", "classify", "--model", str(tmp_path / "missing"), "hello"])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_similarity_default(capsys):
    cli.main(["similarity", "A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."])
    out = capsys.readouterr().out
    assert "closest to sentence 0: sentence 1" in out
