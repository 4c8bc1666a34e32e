"""DeBERTa-v2 / v3's Hugging Face key table."""

from __future__ import annotations

from jaxopt_llm.models.deberta_v2.modeling import DebertaV2, DebertaV2Config
from jaxopt_llm.models.family import Family

_L = "encoder.layer.{i}."
_TABLE = (
    ("embeddings.word_embeddings.weight", "embeddings.word.embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings.position.embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings.token_type.embedding", False),
    ("embeddings.embed_proj.weight", "embeddings.project.kernel", True),
    ("embeddings.LayerNorm.weight", "embeddings.norm.scale", False),
    ("embeddings.LayerNorm.bias", "embeddings.norm.bias", False),
    ("encoder.rel_embeddings.weight", "relative.embedding", False),
    ("encoder.LayerNorm.weight", "relative_norm.scale", False),
    ("encoder.LayerNorm.bias", "relative_norm.bias", False),
    ("encoder.conv.conv.weight", "conv.conv.kernel", True),  # (out, in / groups, k) -> (k, in / groups, out)
    ("encoder.conv.conv.bias", "conv.conv.bias", False),
    ("encoder.conv.LayerNorm.weight", "conv.norm.scale", False),
    ("encoder.conv.LayerNorm.bias", "conv.norm.bias", False),
    *((_L + f"attention.self.{theirs}.{w}", f"layers.{{i}}.attention.{ours}.{p}", w == "weight")
      for theirs, ours in (("query_proj", "query"), ("key_proj", "key"), ("value_proj", "value"),
                           ("pos_key_proj", "pos_key"), ("pos_query_proj", "pos_query"))
      for w, p in (("weight", "kernel"), ("bias", "bias"))),
    (_L + "attention.output.dense.weight", "layers.{i}.attention.out.kernel", True),
    (_L + "attention.output.dense.bias", "layers.{i}.attention.out.bias", False),
    (_L + "attention.output.LayerNorm.weight", "layers.{i}.attention.norm.scale", False),
    (_L + "attention.output.LayerNorm.bias", "layers.{i}.attention.norm.bias", False),
    (_L + "intermediate.dense.weight", "layers.{i}.intermediate.kernel", True),
    (_L + "intermediate.dense.bias", "layers.{i}.intermediate.bias", False),
    (_L + "output.dense.weight", "layers.{i}.output.kernel", True),
    (_L + "output.dense.bias", "layers.{i}.output.bias", False),
    (_L + "output.LayerNorm.weight", "layers.{i}.output_norm.scale", False),
    (_L + "output.LayerNorm.bias", "layers.{i}.output_norm.bias", False),
    ("pooler.dense.weight", "pooler.kernel", True),
    ("pooler.dense.bias", "pooler.bias", False),
    ("classifier.weight", "classifier.kernel", True),
    ("classifier.bias", "classifier.bias", False),
    ("qa_outputs.weight", "qa.kernel", True),
    ("qa_outputs.bias", "qa.bias", False),
)


def _mlm(head: str) -> tuple[tuple[str, str, bool], ...]:
    """The masked-LM head's rows under `head` (BERT's layout: transform, LayerNorm, bias)."""
    dense = "transform.dense" if head == "cls.predictions." else "dense"
    norm = "transform.LayerNorm" if head == "cls.predictions." else "LayerNorm"
    return ((f"{head}{dense}.weight", "mlm.transform.kernel", True),
            (f"{head}{dense}.bias", "mlm.transform.bias", False),
            (f"{head}{norm}.weight", "mlm.norm.scale", False), (f"{head}{norm}.bias", "mlm.norm.bias", False),
            (f"{head}bias", "mlm.bias", False))

DEBERTA_V2 = Family(
    model_type="deberta-v2", config=DebertaV2Config, module=DebertaV2, table=_TABLE, prefix="deberta.",
    head_keys=("pooler.", "classifier.", "cls.", "lm_predictions.", "qa_outputs."),
    derived=("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    heads=("pooler", "classifier", "mlm", "qa"),
    architectures={"base": "DebertaV2Model", "masked-lm": "DebertaV2ForMaskedLM",
                   "sequence-classification": "DebertaV2ForSequenceClassification",
                   "token-classification": "DebertaV2ForTokenClassification",
                   "question-answering": "DebertaV2ForQuestionAnswering"},
    task_tables={"masked-lm/legacy": _mlm("cls.predictions."), "masked-lm/new": _mlm("lm_predictions.lm_head.")},
    variant=lambda config: "legacy" if config.legacy else "new")
