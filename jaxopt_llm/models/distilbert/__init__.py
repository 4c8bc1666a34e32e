"""DistilBERT: BERT's layers without token types or pooler, its own key names and a ReLU classification head."""

from jaxopt_llm.models.distilbert.modeling import DistilBert, DistilBertConfig

__all__ = ["DistilBert", "DistilBertConfig"]
