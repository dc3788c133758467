"""Frozen T5 text encoder: Flax modules, Hugging Face loading, embedding cache.

A leaf package: it imports nothing from imagen_jax but `imagen_jax.axes`.
"""

from imagen_jax.text.cache import EmbeddingCache, write_embedding_cache  # noqa: F401
from imagen_jax.text.encoder import TextEncoder, resolve_dtype  # noqa: F401
from imagen_jax.text.t5 import T5Config, T5Encoder  # noqa: F401
