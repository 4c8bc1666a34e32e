"""Our BERT against the PyTorch transformers reference: random tiny models and real MiniLM weights."""

import numpy as np
import pytest
from conftest import HF_CLASSES, hf_model, torch_output

from jaxopt_llm.assets import minilm_path
from jaxopt_llm.models import bert


@pytest.mark.parametrize("task", list(HF_CLASSES))
def test_tiny_random_parity(task, hf_dirs, batch):
    ids, mask, types = batch
    ref = torch_output(hf_model(task), task, ids, mask, types)
    ours = bert.from_pretrained(hf_dirs[task], task)(ids, attention_mask=mask, token_type_ids=types)  # HF keywords
    if task in ("pretraining", "question-answering"):  # two outputs: (MLM, NSP) or (start, end)
        assert np.abs(np.asarray(ours[0]) - ref[0]).max() <= 1e-5
        assert np.abs(np.asarray(ours[1]) - ref[1]).max() <= 1e-5
        assert np.asarray(ours[0]).shape == ref[0].shape and np.asarray(ours[1]).shape == ref[1].shape
    else:
        assert np.asarray(ours).shape == ref.shape
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-5
        assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero arrays


def test_regression_head_parity(tmp_path, batch):
    ids, mask, types = batch
    model = hf_model("sequence-classification", num_labels=1)
    model.save_pretrained(tmp_path)
    ours = bert.from_pretrained(tmp_path, "sequence-classification")
    assert ours.config.num_labels == 1
    np.testing.assert_allclose(np.asarray(ours(ids, mask, types)), torch_output(model, "x", ids, mask, types),
                               atol=1e-5, rtol=0)


SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, I loved every minute of it!",
    "Self-driving cars will never be trusted on busy city streets.",
    "ok",
]


def test_minilm_real_weights_parity():
    import torch
    import transformers

    folder = minilm_path()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(SENTENCES, padding=True, return_tensors="np")
    ref_model = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = ref_model(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    ours = np.asarray(bert.from_pretrained(folder)(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]))
    assert ours.shape == (4, enc["input_ids"].shape[1], 384)
    assert np.abs(ours - ref).max() <= 1e-4


def test_scanned_layers_equal_unrolled_and_round_trip_through_transformers(hf_dirs, batch, tmp_path):
    import jax
    import optax
    import transformers
    from conftest import make_batch, task_for
    from flax import nnx

    from jaxopt_llm import state as state_lib
    from jaxopt_llm.steps import clean

    ids, mask, types = batch
    for task in ("base", "pretraining"):
        unrolled = bert.from_pretrained(hf_dirs[task], task)
        scanned = bert.from_pretrained(hf_dirs[task], task, scan_layers=True)
        assert scanned.layers.attention.qkv.kernel[...].shape == (1, 24, 72)  # (layers but the last, d, 3d)
        assert scanned.last_layer.attention.qkv.kernel[...].shape == (24, 72)
        for a, b in zip(jax.tree.leaves(unrolled(ids, mask, types)), jax.tree.leaves(scanned(ids, mask, types))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    bert.save_pretrained(scanned, tmp_path)  # the checkpoint names layers one by one, as transformers does
    reloaded = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    ref = torch_output(hf_model("pretraining"), "pretraining", ids, mask, types)
    np.testing.assert_array_equal(torch_output(reloaded, "pretraining", ids, mask, types)[0], ref[0])
    # a train step with dropout and the last layer at [CLS] only, plain and with remat: the same update
    cls_dir = hf_dirs["sequence-classification"]
    outs = []
    for changes in ({}, {"scan_layers": True}, {"scan_layers": True, "remat": "full"},
                    {"scan_layers": True, "scan_unroll": True}):
        graphdef, params = nnx.split(bert.from_pretrained(cls_dir, "sequence-classification", **changes))
        step = jax.jit(clean.make_train_step(graphdef, optax.sgd(0.5), task_for("sequence-classification")))
        new, _ = step(state_lib.create(params, optax.sgd(0.5)), make_batch(), jax.random.key(1))
        outs.append(np.asarray(new.params["classifier"]["kernel"][...]))
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=1e-6)


def test_a_one_layer_scanned_encoder_equals_the_unrolled_one():
    """With one layer there is nothing to scan: the stack is absent and the last layer is the encoder."""
    import jax.numpy as jnp
    from flax import nnx

    ids = jnp.arange(16).reshape(2, 8)
    unrolled, scanned = (bert.Bert(bert.BertConfig.tiny(num_hidden_layers=1, scan_layers=s), rngs=nnx.Rngs(0))
                         for s in (False, True))
    assert scanned.layers is None
    np.testing.assert_allclose(np.asarray(scanned(ids)), np.asarray(unrolled(ids)), atol=1e-6)


def test_scan_unroll_leaves_no_layer_loop_after_compilation():
    """scan_unroll: the compiled program has the unrolled encoder's loops, the plain scan two more (forward and
    backward over layers 1 .. L-1); counted in the optimised HLO, where XLA has inlined one-trip loops."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    ids = jnp.ones((2, 8), jnp.int32)
    loops = []
    for changes in ({}, {"scan_layers": True}, {"scan_layers": True, "scan_unroll": True}):
        config = bert.BertConfig.tiny(num_hidden_layers=4, **changes)
        graphdef, params = nnx.split(bert.Bert(config, rngs=nnx.Rngs(0)))
        grad = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(ids).sum()))
        loops.append(grad.lower(params).compile().as_text().count(" while("))
    assert loops[1] == loops[0] + 2 and loops[2] == loops[0], loops
    with pytest.raises(ValueError, match="set scan_layers=True as well"):  # alone it would change nothing
        bert.BertConfig.tiny(num_hidden_layers=4, scan_unroll=True)


@pytest.mark.parametrize("k,n,tied", [(6, 10, False), (10, 6, False), (4, 9, True)])
def test_dense_vjp_equals_the_plain_expression(k, n, tied):
    """Both orders of the weight-gradient product, and the MLM decoder's use: the weight given transposed
    (the word embeddings, (v, d)), gradients taken for it."""
    import jax
    import jax.numpy as jnp

    from jaxopt_llm.models.bert.modeling import dense

    rng = np.random.RandomState(0)
    x, w, b, g = rng.randn(2, 3, k), rng.randn(n, k) if tied else rng.randn(k, n), rng.randn(n), rng.randn(2, 3, n)
    x, w, b, g = (jnp.asarray(a, jnp.float32) for a in (x, w, b, g))
    weight = (lambda w: w.T) if tied else (lambda w: w)
    ours = jax.vjp(lambda x, w, b: dense(x, weight(w), b, jnp.dtype(jnp.float32)), x, w, b)
    ref = jax.vjp(lambda x, w, b: jnp.dot(x, weight(w)) + b, x, w, b)
    np.testing.assert_allclose(ours[0], ref[0], rtol=0, atol=1e-6)
    for a, r in zip(ours[1](g), ref[1](g)):
        assert a.shape == r.shape and a.dtype == r.dtype
        np.testing.assert_allclose(a, r, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["sequence-classification", "masked-lm", "token-classification"])
def test_gradients_equal_pytorch(task, hf_dirs, batch):
    """Every parameter's gradient of the task's loss (dropout off) against PyTorch's autograd."""
    import jax
    import torch
    from flax import nnx

    from jaxopt_llm import losses

    ids, mask, types = batch
    if task == "masked-lm":  # a few labelled positions, -100 elsewhere (PyTorch's convention)
        labels = np.full(ids.shape, -100)
        labels[:, 1:4] = ids[:, 1:4]
    elif task == "token-classification":  # a tag per real token but [CLS], -100 at padding
        labels = np.where(mask > 0, np.random.default_rng(0).integers(0, 3, ids.shape), -100)
        labels[:, 0] = -100
    else:
        labels = np.array([0, 2, 1])
    ref_model = hf_model(task)
    ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
              labels=torch.tensor(labels)).loss.backward()
    ref = {name: p.grad.numpy() for name, p in ref_model.named_parameters()}

    model = bert.from_pretrained(hf_dirs[task], task)
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, mask, types)
        where = labels >= 0
        return losses.cross_entropy(logits, np.maximum(labels, 0), where).sum() / where.sum()

    grads = bert.params.to_hf_tensors(nnx.merge(graphdef, jax.grad(loss)(params)))
    assert sorted(grads) == sorted(ref)
    for name, g in grads.items():
        np.testing.assert_allclose(g, ref[name], rtol=0, atol=1e-6, err_msg=name)
    assert max(np.abs(g).max() for g in ref.values()) > 1e-2  # not a comparison of near-zero arrays

