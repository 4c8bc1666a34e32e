"""DeBERTa-v2 / v3: disentangled attention over relative position buckets."""

from jaxopt_llm.models.deberta_v2.modeling import DebertaV2, DebertaV2Config

__all__ = ["DebertaV2", "DebertaV2Config"]
