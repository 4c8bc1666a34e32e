"""Cloze prompts: label scores against transformers' BertForMaskedLM (single- and multi-token words, two
patterns, padding), the vmapped pattern ensemble against a loop, a prompt run reloaded from its folder,
prompt training under the adversarial and distillation methods, and one clear error per bad prompt."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY, overrides
from flax import nnx

from jaxopt_llm import cli, inference
from jaxopt_llm import config as config_lib
from jaxopt_llm.assets import minilm_path
from jaxopt_llm.models import bert
from jaxopt_llm.parallel import compile_count
from jaxopt_llm.steps import prompt as P
from jaxopt_llm.train import train

TEXTS = ["what a lovely day", "the service was slow and the food cold, never again", "it is a phone",
         "ok"]
# "great" and "bad" are one token each; "mediocre" three (med ##io ##cre); "meh" two
VERBALIZER = {"negative": ["bad", "mediocre"], "neutral": ["meh"], "positive": ["great"]}
PATTERNS = ["{text} It was [MASK].", "Review: {text} All in all, [MASK]!"]


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    """A tiny random BertForMaskedLM with the MiniLM vocabulary and tokenizer."""
    folder = tmp_path_factory.mktemp("mlm")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.BertConfig(**{**TINY, "vocab_size": tok.vocab_size, "max_position_embeddings": 64})
    torch.manual_seed(3)
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def reference_scores(model, tok, pattern, texts, verbalizer, combine):
    """Label scores computed the plain way: one input per (text, word length) with k [MASK] tokens, the
    sum of the word's token log-probabilities at them, logsumexp (or mean) over a label's words."""
    out = np.zeros((len(texts), len(verbalizer)))
    for c, words in enumerate(verbalizer.values()):
        per_word = []
        for word in words:
            ids = tok(word, add_special_tokens=False)["input_ids"]
            inputs = [pattern.replace("{text}", t).replace("[MASK]", " ".join(["[MASK]"] * len(ids))) for t in texts]
            enc = tok(inputs, padding=True, return_tensors="pt")  # padding on: rows of different lengths
            with torch.no_grad():
                logp = torch.log_softmax(model(**enc).logits, -1).numpy()
            score = np.zeros(len(texts))
            for r in range(len(texts)):
                where = np.flatnonzero(enc["input_ids"][r].numpy() == tok.mask_token_id)
                score[r] = sum(logp[r, pos, token] for pos, token in zip(where, ids))  # by hand, token by token
            per_word.append(score)
        per_word = np.stack(per_word)
        out[:, c] = (np.log(np.exp(per_word).sum(0)) if combine == "logsumexp" else per_word.mean(0))
    return out


@pytest.mark.parametrize("combine", ["logsumexp", "mean"])
def test_label_scores_equal_transformers(mlm, combine):
    folder, ref, tok = mlm
    model = bert.from_pretrained(folder, "masked-lm")
    for pattern in PATTERNS:
        prompt = P.Prompt.parse(pattern, VERBALIZER, combine)
        task = P.PromptTask(P.encode_prompt(prompt, tok, 40), tok)
        assert task.encoded.lengths == (1, 2, 3)  # three word lengths packed side by side in one row
        batch = task.encode(TEXTS)
        ours = np.asarray(P.label_scores(model, model.embed(batch["prompt_ids"]), batch, task.encoded))
        np.testing.assert_allclose(ours, reference_scores(ref, tok, pattern, TEXTS, VERBALIZER, combine),
                                   atol=2e-5, rtol=1e-5)


def test_truncation_shortens_the_text_never_the_pattern(mlm):
    _, _, tok = mlm
    task = P.PromptTask(P.encode_prompt(P.Prompt.parse(PATTERNS[0], VERBALIZER), tok, 16), tok)
    row = task.encode(["word " * 50])["prompt_ids"][0, :16]
    tokens = tok.convert_ids_to_tokens(row.tolist())
    # 16 - 2 specials - 3 pattern tokens - 3 slots (the longest word) = 8 text tokens; the k = 1 variant
    assert tokens == ["[CLS]", *["word"] * 8, "it", "was", "[MASK]", ".", "[SEP]", "[PAD]", "[PAD]"]


def test_pattern_ensemble_is_one_program_equal_to_a_loop(mlm, capsys):
    folder, _, tok = mlm
    prompts = [P.Prompt.parse(p, VERBALIZER) for p in PATTERNS]
    ensemble = inference.prompt_ensemble(folder, prompts, max_length=40, batch_size=4)
    before = compile_count()
    members = ensemble.member_probs(TEXTS)
    assert compile_count() - before == 1 and members.shape == (2, 4, 3)
    for p, prompt in enumerate(prompts):
        single = inference.load(folder, prompt=prompt, max_length=40, batch_size=4).classify(TEXTS)
        np.testing.assert_allclose(members[p], [r["scores"] for r in single], atol=1e-6)
    capsys.readouterr()
    cli.main(["predict", "classify", "--model", str(folder), "--pattern", PATTERNS[0], "--pattern", PATTERNS[1],
              "--verbalizer", "negative=bad|mediocre;neutral=meh;positive=great", "--max-length", "40", *TEXTS])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([r["scores"] for r in rows], members.mean(0), atol=1e-6)  # equal weights
    accuracy = ensemble.fit_weights(TEXTS, [2, 0, 1, 1])
    np.testing.assert_allclose(ensemble.weights, accuracy / accuracy.sum())
    np.testing.assert_allclose(ensemble.probs(TEXTS), np.einsum("p,pnc->nc", ensemble.weights, members), atol=1e-6)


@pytest.fixture(scope="module")
def prompt_run(setup, mlm, tmp_path_factory):
    folder, _, _ = mlm
    workdir = tmp_path_factory.mktemp("prompt") / "run"
    items = overrides(setup, **{"model.name_or_path": folder, "train.steps": 3, "train.learning_rate": 1e-3,
                                "data.max_length": 32})
    cli.main(["prompt", "--workdir", str(workdir), *items, "prompt.pattern={text} Overall it was [MASK].",
              "prompt.verbalizer=negative=bad|mediocre;neutral=meh;positive=great"])
    return workdir


def test_a_prompt_run_reloads_from_its_folder_and_predicts_the_same(prompt_run, capsys):
    record = json.loads((prompt_run / "prompt.json").read_text())
    assert record["pattern"] == "{text} Overall it was [MASK]." and record["max_length"] == 32
    assert record["word_tokens"]["negative"]["mediocre"] == [19960, 3695, 16748]
    assert json.loads((prompt_run / "labels.json").read_text()) == ["negative", "neutral", "positive"]
    reloaded = inference.load(prompt_run).classify(TEXTS)
    by_hand = inference.load(prompt_run / "model", prompt=P.Prompt.parse(
        record["pattern"], record["verbalizer"]), max_length=32).classify(TEXTS)
    assert reloaded == by_hand
    capsys.readouterr()
    cli.main(["predict", "classify", "--model", str(prompt_run), *TEXTS[:2]])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    np.testing.assert_allclose([r["scores"] for r in rows], [r["scores"] for r in reloaded[:2]], atol=1e-6)


def test_prompt_task_under_adversarial_training_and_pet_distillation(setup, mlm, prompt_run, tmp_path):
    folder, _, _ = mlm
    base = overrides(setup, **{"model.name_or_path": folder, "train.steps": 2, "data.max_length": 32,
                               "train.log_every": 1})
    adv = config_lib.load(None, [*base, "task=prompt", "method=adversarial", "adversarial.epsilon=0.01",
                                 "adversarial.inner_steps=1"])
    metrics = train(adv, tmp_path / "adv")
    assert {"accuracy", "f1", "loss"} <= set(metrics)
    assert json.loads((tmp_path / "adv" / "run.json").read_text())["train_step_compiles"] == 1
    # PET's last step: the prompt run's soft labels taught to an ordinary classifier
    kd = config_lib.load(None, [*base, "method=distill", f"distill.teacher={prompt_run}", "distill.alpha=1.0",
                                "distill.student_layers=2"])
    train(kd, tmp_path / "kd")
    student = bert.from_pretrained(tmp_path / "kd", "sequence-classification")
    assert student.config.labels == ("negative", "neutral", "positive") and student.task == "sequence-classification"
    logged = [json.loads(line) for line in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert {"kl", "agreement"} <= set(logged[0]) and logged[0]["kl"] > 0


BAD = [
    (["prompt.pattern={text} was good"], r"has 0 \[MASK\] slots"),
    (["prompt.pattern={text} [MASK] or [MASK]"], r"has 2 \[MASK\] slots"),
    (["prompt.pattern={txt} It was [MASK]."], r"unknown placeholder\(s\) \['\{txt\}'\]"),
    (["prompt.verbalizer=negative=bad;neutral=;positive=great"], r"label\(s\) \['neutral'\] have no words"),
    (["prompt.verbalizer=negative=bad;positive"], r"'positive' is not label=word"),
    (["prompt.combine=max"], r"prompt.combine='max'"),
]


@pytest.mark.parametrize("items, message", BAD)
def test_bad_prompts_are_one_clear_error(items, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load(None, ["data.train_file=x.csv", "task=prompt", *items])


def test_a_word_missing_from_the_vocabulary_stops_before_compiling(setup, mlm, tmp_path):
    folder, _, _ = mlm
    config = config_lib.load(None, [*overrides(setup, **{"model.name_or_path": folder}), "task=prompt",
                                    "prompt.verbalizer=negative=bad;neutral=meh;positive=\u2603\u2603"])
    before = compile_count()
    with pytest.raises(P.PromptError, match=r"\['\u2603\u2603'\] are not in the tokenizer's vocabulary"):
        train(config, tmp_path / "run")
    assert compile_count() == before and not (tmp_path / "run").exists()


def test_nnx_split_of_the_prompt_model_has_no_classifier(prompt_run):
    model = bert.from_pretrained(prompt_run, "masked-lm")
    assert model.classifier is None and "mlm" in nnx.state(model)


def test_a_prompt_run_exports_and_the_artifact_predicts_the_same(prompt_run, tmp_path):
    from jaxopt_llm.export import export
    from jaxopt_llm.serving.artifact import Artifact

    export(str(prompt_run), tmp_path / "art", golden_texts=TEXTS)
    art = Artifact.load(tmp_path / "art")
    assert art.manifest["kind"] == "prompt" and art.labels == ["negative", "neutral", "positive"]
    expected = [r["scores"] for r in inference.load(prompt_run).classify(TEXTS)]
    np.testing.assert_allclose(art.predict(TEXTS)[0], expected, atol=1e-5)
