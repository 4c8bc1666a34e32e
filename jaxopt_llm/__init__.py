"""jaxopt_llm: BERT-style encoders in JAX / Flax NNX, from Hugging Face checkpoints to deployment."""

from jaxopt_llm import bert
from jaxopt_llm.bert import Bert, BertConfig, from_pretrained, save_pretrained

__version__ = "0.1.0"
__all__ = ["Bert", "BertConfig", "bert", "from_pretrained", "save_pretrained"]
