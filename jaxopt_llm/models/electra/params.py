"""ELECTRA's Hugging Face key table: the encoder's keys are BERT's under "electra.", plus the embedding
projection and ELECTRA's heads."""

from __future__ import annotations

from jaxopt_llm.models.bert.params import _TABLE as _BERT_TABLE
from jaxopt_llm.models.electra.modeling import Electra, ElectraConfig
from jaxopt_llm.models.family import Family

_ENCODER = tuple(row for row in _BERT_TABLE if not row[0].startswith(("cls.", "classifier.", "pooler.")))
_TABLE = _ENCODER + (
    ("embeddings_project.weight", "embeddings_project.kernel", True),
    ("embeddings_project.bias", "embeddings_project.bias", False),
    ("classifier.dense.weight", "pooler.kernel", True),  # ElectraClassificationHead: dense -> GELU -> out_proj
    ("classifier.dense.bias", "pooler.bias", False),
    ("classifier.out_proj.weight", "classifier.kernel", True),
    ("classifier.out_proj.bias", "classifier.bias", False),
    ("generator_predictions.dense.weight", "mlm.transform.kernel", True),
    ("generator_predictions.dense.bias", "mlm.transform.bias", False),
    ("generator_predictions.LayerNorm.weight", "mlm.norm.scale", False),
    ("generator_predictions.LayerNorm.bias", "mlm.norm.bias", False),
    ("generator_lm_head.bias", "mlm.bias", False),
    ("discriminator_predictions.dense.weight", "discriminator.dense.kernel", True),
    ("discriminator_predictions.dense.bias", "discriminator.dense.bias", False),
    ("discriminator_predictions.dense_prediction.weight", "discriminator.prediction.kernel", True),
    ("discriminator_predictions.dense_prediction.bias", "discriminator.prediction.bias", False),
)

ELECTRA = Family(
    model_type="electra", config=ElectraConfig, module=Electra, table=_TABLE, prefix="electra.",
    head_keys=("classifier.", "generator_", "discriminator_", "qa_outputs."),
    derived=("embeddings.position_ids", "embeddings.token_type_ids", "generator_lm_head.weight"),
    heads=("pooler", "mlm", "classifier", "discriminator", "qa"),
    architectures={"base": "ElectraModel", "masked-lm": "ElectraForMaskedLM",
                   "sequence-classification": "ElectraForSequenceClassification",
                   "replaced-token-detection": "ElectraForPreTraining",
                   "token-classification": "ElectraForTokenClassification",
                   "question-answering": "ElectraForQuestionAnswering"},
    task_tables={"token-classification": (("classifier.weight", "classifier.kernel", True),
                                          ("classifier.bias", "classifier.bias", False))})
