"""Shared fixtures. Environment is fixed before JAX starts: 8 fake CPU devices, offline hub."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="jaxopt-llm-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

# Distinct sizes so that a swapped axis fails loudly: vocab 101, hidden 24, 3 heads of 8, FFN 40, 2 layers.
TINY = dict(vocab_size=101, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
            max_position_embeddings=40, type_vocab_size=2, initializer_range=0.1)

HF_CLASSES = {
    "base": "BertModel",
    "masked-lm": "BertForMaskedLM",
    "pretraining": "BertForPreTraining",
    "sequence-classification": "BertForSequenceClassification",
}


def hf_model(task, seed=0, **changes):
    """A random transformers BERT for `task` in eval mode."""
    import torch
    import transformers

    config = transformers.BertConfig(**{**TINY, "num_labels": 3, **changes})
    torch.manual_seed(seed)
    return getattr(transformers, HF_CLASSES[task])(config).eval()


def torch_output(model, task, ids, mask, types):
    """The output our model returns for `task`, computed by the PyTorch reference, as numpy."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types))
    if task == "base":
        return out.last_hidden_state.numpy()
    if task == "pretraining":
        return out.prediction_logits.numpy(), out.seq_relationship_logits.numpy()
    return out.logits.numpy()


@pytest.fixture(scope="session")
def batch():
    """3 x 11 token ids with padding in two rows and both token types."""
    rng = np.random.RandomState(0)
    ids = rng.randint(1, TINY["vocab_size"], (3, 11)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return ids, mask, types


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """task -> folder of a random tiny HF model written by transformers' save_pretrained."""
    dirs = {}
    for task in HF_CLASSES:
        d = tmp_path_factory.mktemp(task)
        hf_model(task).save_pretrained(d)
        dirs[task] = d
    return dirs
