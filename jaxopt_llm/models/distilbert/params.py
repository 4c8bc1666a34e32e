"""DistilBERT's Hugging Face key table."""

from __future__ import annotations

from jaxopt_llm.models.distilbert.modeling import DistilBert, DistilBertConfig
from jaxopt_llm.models.family import Family

_LAYER = "transformer.layer.{i}."
_TABLE = (
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", False),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", False),
    (_LAYER + "attention.{part}.weight", "layers.{i}.attention.qkv.kernel", True),
    (_LAYER + "attention.{part}.bias", "layers.{i}.attention.qkv.bias", False),
    (_LAYER + "attention.out_lin.weight", "layers.{i}.attention.out.kernel", True),
    (_LAYER + "attention.out_lin.bias", "layers.{i}.attention.out.bias", False),
    (_LAYER + "sa_layer_norm.weight", "layers.{i}.attention_norm.scale", False),
    (_LAYER + "sa_layer_norm.bias", "layers.{i}.attention_norm.bias", False),
    (_LAYER + "ffn.lin1.weight", "layers.{i}.intermediate.kernel", True),
    (_LAYER + "ffn.lin1.bias", "layers.{i}.intermediate.bias", False),
    (_LAYER + "ffn.lin2.weight", "layers.{i}.output.kernel", True),
    (_LAYER + "ffn.lin2.bias", "layers.{i}.output.bias", False),
    (_LAYER + "output_layer_norm.weight", "layers.{i}.output_norm.scale", False),
    (_LAYER + "output_layer_norm.bias", "layers.{i}.output_norm.bias", False),
    ("pre_classifier.weight", "pooler.kernel", True),
    ("pre_classifier.bias", "pooler.bias", False),
    ("classifier.weight", "classifier.kernel", True),
    ("classifier.bias", "classifier.bias", False),
    ("vocab_transform.weight", "mlm.transform.kernel", True),
    ("vocab_transform.bias", "mlm.transform.bias", False),
    ("vocab_layer_norm.weight", "mlm.norm.scale", False),
    ("vocab_layer_norm.bias", "mlm.norm.bias", False),
    ("vocab_projector.bias", "mlm.bias", False),
    ("qa_outputs.weight", "qa.kernel", True),
    ("qa_outputs.bias", "qa.bias", False),
)

DISTILBERT = Family(
    model_type="distilbert", config=DistilBertConfig, module=DistilBert, table=_TABLE, prefix="distilbert.",
    head_keys=("pre_classifier.", "classifier.", "vocab_", "qa_outputs."), parts=("q_lin", "k_lin", "v_lin"),
    derived=("embeddings.position_ids", "vocab_projector.weight"), heads=("pooler", "mlm", "classifier", "qa"),
    architectures={"base": "DistilBertModel", "masked-lm": "DistilBertForMaskedLM",
                   "sequence-classification": "DistilBertForSequenceClassification",
                   "token-classification": "DistilBertForTokenClassification",
                   "question-answering": "DistilBertForQuestionAnswering"})
