"""The BERT family's Hugging Face key table: every BERT key name lives here and nowhere else.

Reading and writing checkpoints is generic (`jaxopt_llm.models.convert`); this module only declares the table.
The names below are re-exported for code written against `jaxopt_llm.models.bert.params`.
"""

from __future__ import annotations

from jaxopt_llm.models import config_of, task_of
from jaxopt_llm.models.bert.modeling import Bert, BertConfig
from jaxopt_llm.models.convert import (
                                       convert,
                                       from_pretrained,
                                       save_pretrained,
                                       stack_layers,
                                       to_hf_tensors,
                                       unstack_layers,
)
from jaxopt_llm.models.family import Family
from jaxopt_llm.models.hub import CheckpointError, CheckpointWarning, load_tokenizer, read_config, read_weights, resolve

# (HF key without the "bert." prefix, our parameter path, transpose). {i}: layer; {part}: one third of qkv.
_TABLE = [
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", False),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", False),
    ("encoder.layer.{i}.attention.self.{part}.weight", "layers.{i}.attention.qkv.kernel", True),
    ("encoder.layer.{i}.attention.self.{part}.bias", "layers.{i}.attention.qkv.bias", False),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers.{i}.attention.out.kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers.{i}.attention.out.bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers.{i}.attention_norm.scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers.{i}.attention_norm.bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers.{i}.intermediate.kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers.{i}.intermediate.bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers.{i}.output.kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers.{i}.output.bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers.{i}.output_norm.scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers.{i}.output_norm.bias", False),
    ("pooler.dense.weight", "pooler.kernel", True),
    ("pooler.dense.bias", "pooler.bias", False),
    ("cls.predictions.transform.dense.weight", "mlm.transform.kernel", True),
    ("cls.predictions.transform.dense.bias", "mlm.transform.bias", False),
    ("cls.predictions.transform.LayerNorm.weight", "mlm.norm.scale", False),
    ("cls.predictions.transform.LayerNorm.bias", "mlm.norm.bias", False),
    ("cls.predictions.bias", "mlm.bias", False),
    ("cls.seq_relationship.weight", "nsp.kernel", True),
    ("cls.seq_relationship.bias", "nsp.bias", False),
    ("classifier.weight", "classifier.kernel", True),
    ("classifier.bias", "classifier.bias", False),
    ("qa_outputs.weight", "qa.kernel", True),
    ("qa_outputs.bias", "qa.bias", False),
]
FAMILY = Family(
    model_type="bert", config=BertConfig, module=Bert, table=tuple(_TABLE), prefix="bert.",
    head_keys=("cls.", "classifier.", "qa_outputs."),  # HF keys that never carry the "bert." prefix
    derived=("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    heads=("pooler", "mlm", "nsp", "classifier", "qa"),
    architectures={"base": "BertModel", "masked-lm": "BertForMaskedLM", "pretraining": "BertForPreTraining",
                   "sequence-classification": "BertForSequenceClassification",
                   "token-classification": "BertForTokenClassification",
                   "question-answering": "BertForQuestionAnswering"})

__all__ = ["FAMILY", "CheckpointError", "CheckpointWarning", "config_of", "convert", "from_pretrained",
           "load_tokenizer", "read_config", "read_weights", "resolve", "save_pretrained", "stack_layers", "task_of",
           "to_hf_tensors", "unstack_layers"]
