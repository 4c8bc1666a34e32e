"""ModernBERT: rotary positions, GeGLU, pre-norm without biases, alternating global and sliding-window attention."""

from jaxopt_llm.models.modernbert.modeling import ModernBert, ModernBertConfig

__all__ = ["ModernBert", "ModernBertConfig"]
