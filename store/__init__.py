"""The embedding cache, the contract between the stages: its format, commits, fingerprints and readers."""

from litpipe.store.cache import CacheError, EmbeddingCache, list_caches, resolve_cache
from litpipe.store.reader import Batch, CacheContents, StreamingReader, load_all

__all__ = ["Batch", "CacheContents", "CacheError", "EmbeddingCache", "StreamingReader", "list_caches", "load_all",
           "resolve_cache"]
