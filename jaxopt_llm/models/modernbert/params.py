"""ModernBERT's Hugging Face key table."""

from __future__ import annotations

from jaxopt_llm.models.family import Family
from jaxopt_llm.models.modernbert.modeling import ModernBert, ModernBertConfig

_L = "layers.{i}."
_TABLE = (
    ("embeddings.tok_embeddings.weight", "word.embedding", False),
    ("embeddings.norm.weight", "embedding_norm.scale", False),
    ("embeddings.norm.bias", "embedding_norm.bias", False),
    (_L + "attn_norm.weight", "layers.{i}.attn_norm.scale", False),
    (_L + "attn_norm.bias", "layers.{i}.attn_norm.bias", False),
    (_L + "attn.Wqkv.weight", "layers.{i}.wqkv.kernel", True),
    (_L + "attn.Wqkv.bias", "layers.{i}.wqkv.bias", False),
    (_L + "attn.Wo.weight", "layers.{i}.out.kernel", True),
    (_L + "attn.Wo.bias", "layers.{i}.out.bias", False),
    (_L + "mlp_norm.weight", "layers.{i}.mlp_norm.scale", False),
    (_L + "mlp_norm.bias", "layers.{i}.mlp_norm.bias", False),
    (_L + "mlp.Wi.weight", "layers.{i}.wi.kernel", True),
    (_L + "mlp.Wi.bias", "layers.{i}.wi.bias", False),
    (_L + "mlp.Wo.weight", "layers.{i}.wo.kernel", True),
    (_L + "mlp.Wo.bias", "layers.{i}.wo.bias", False),
    ("final_norm.weight", "final_norm.scale", False),
    ("final_norm.bias", "final_norm.bias", False),
    ("head.dense.weight", "head.dense.kernel", True),
    ("head.dense.bias", "head.dense.bias", False),
    ("head.norm.weight", "head.norm.scale", False),
    ("head.norm.bias", "head.norm.bias", False),
    ("decoder.bias", "decoder_bias", False),
    ("classifier.weight", "classifier.kernel", True),
    ("classifier.bias", "classifier.bias", False),
)

MODERNBERT = Family(
    model_type="modernbert", config=ModernBertConfig, module=ModernBert, table=_TABLE, prefix="model.",
    head_keys=("head.", "decoder.", "classifier."), derived=("decoder.weight",),
    heads=("head", "decoder_bias", "classifier"),
    architectures={"base": "ModernBertModel", "masked-lm": "ModernBertForMaskedLM",
                   "sequence-classification": "ModernBertForSequenceClassification",
                   "token-classification": "ModernBertForTokenClassification",
                   "question-answering": "ModernBertForQuestionAnswering"})
