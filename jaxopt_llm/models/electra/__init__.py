"""ELECTRA: BERT's layers behind embeddings that may be narrower (projected), its GELU classification head and
the generator's masked-LM head."""

from jaxopt_llm.models.electra.modeling import Electra, ElectraConfig

__all__ = ["Electra", "ElectraConfig"]
