"""The embedding cache and the text-tower artifact: everything one stage writes and another reads."""

from litpipe.store.cache import CacheError, EmbeddingCache, list_caches, resolve_cache
from litpipe.store.reader import Batch, CacheContents, StreamingReader

__all__ = ["Batch", "CacheContents", "CacheError", "EmbeddingCache", "StreamingReader", "list_caches", "resolve_cache"]
