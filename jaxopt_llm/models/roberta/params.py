"""RoBERTa / XLM-RoBERTa Hugging Face key tables: the encoder's keys are BERT's under "roberta.", the heads
their own."""

from __future__ import annotations

from jaxopt_llm.models.bert.params import _TABLE as _BERT_TABLE
from jaxopt_llm.models.family import Family
from jaxopt_llm.models.roberta.modeling import Roberta, RobertaConfig, XLMRoberta, XLMRobertaConfig

_ENCODER = tuple(row for row in _BERT_TABLE if not row[0].startswith(("cls.", "classifier.")))
_TABLE = _ENCODER + (
    ("lm_head.dense.weight", "mlm.transform.kernel", True),
    ("lm_head.dense.bias", "mlm.transform.bias", False),
    ("lm_head.layer_norm.weight", "mlm.norm.scale", False),
    ("lm_head.layer_norm.bias", "mlm.norm.bias", False),
    ("lm_head.bias", "mlm.bias", False),
)
_TAGGER = (("classifier.weight", "classifier.kernel", True), ("classifier.bias", "classifier.bias", False))
_CLASSIFIER = (  # RobertaClassificationHead: its dense is our pooler, its out_proj our classifier
    ("classifier.dense.weight", "pooler.kernel", True),
    ("classifier.dense.bias", "pooler.bias", False),
    ("classifier.out_proj.weight", "classifier.kernel", True),
    ("classifier.out_proj.bias", "classifier.bias", False),
)
_DERIVED = ("embeddings.position_ids", "embeddings.token_type_ids", "lm_head.decoder.weight", "lm_head.decoder.bias")


def _family(model_type: str, config: type, module: type, prefix: str, name: str) -> Family:
    return Family(model_type=model_type, config=config, module=module, table=_TABLE, prefix=prefix,
                  head_keys=("lm_head.", "classifier.", "qa_outputs."), derived=_DERIVED,
                  heads=("pooler", "mlm", "classifier", "qa"),
                  architectures={"base": f"{name}Model", "masked-lm": f"{name}ForMaskedLM",
                                 "sequence-classification": f"{name}ForSequenceClassification",
                                 "token-classification": f"{name}ForTokenClassification",
                                 "question-answering": f"{name}ForQuestionAnswering"},
                  task_tables={"sequence-classification": _CLASSIFIER, "token-classification": _TAGGER})


ROBERTA = _family("roberta", RobertaConfig, Roberta, "roberta.", "Roberta")
XLM_ROBERTA = _family("xlm-roberta", XLMRobertaConfig, XLMRoberta, "roberta.", "XLMRoberta")
