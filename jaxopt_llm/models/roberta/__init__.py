"""RoBERTa and XLM-RoBERTa: BERT's encoder with positions offset by the padding index and their own heads."""

from jaxopt_llm.models.roberta.modeling import Roberta, RobertaConfig, XLMRoberta, XLMRobertaConfig

__all__ = ["Roberta", "RobertaConfig", "XLMRoberta", "XLMRobertaConfig"]
