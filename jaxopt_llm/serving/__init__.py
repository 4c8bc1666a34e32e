"""Serving an exported artifact: the loader (jax + tokenizers only), micro-batching, metrics and drift, and
the ASGI app. Nothing here imports flax, transformers or torch."""
