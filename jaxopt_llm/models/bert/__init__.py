"""BERT: the model, its config, and Hugging Face checkpoints in and out."""

from jaxopt_llm.models.bert.modeling import TASKS, Bert, BertConfig
from jaxopt_llm.models.bert.params import (
           CheckpointError,
           CheckpointWarning,
           from_pretrained,
           load_tokenizer,
           save_pretrained,
)

__all__ = ["TASKS", "Bert", "BertConfig", "CheckpointError", "CheckpointWarning", "from_pretrained",
           "load_tokenizer", "save_pretrained"]
