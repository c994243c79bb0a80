"""Fetch a cached sample's original image bytes by key, from the input shard it was embedded from.

The cache keeps vectors, not pixels; its shard records say which input shard each output shard
came from, so a key leads to one input shard, read once (through the store's one definition of
samples and keys) for all the keys wanted from it. Used by `litpipe search --html` and `litpipe serve`.
"""

from __future__ import annotations

from litpipe.store.parts import open_part
from litpipe.config import DatasetConfig
from litpipe.errors import UserError
from litpipe.store import EmbeddingCache
from litpipe.sources import TransientReadError, read_shard


class ImageSourceError(UserError):
    """A key whose image cannot be found in its source."""


class ImageFetcher:
    """Image bytes for keys of one cache, read from the dataset's source shards."""

    def __init__(self, cache: EmbeddingCache, dataset: DatasetConfig):
        self.cache = cache
        self.dataset = dataset
        self._input_of: dict[str, str] | None = None

    def input_of(self, key: str) -> str:
        """The input shard URL `key` was embedded from (the shards' key columns, read once)."""
        if self._input_of is None:  # built whole, then published: a thread or a failed read never sees half a map
            input_of = {}
            for record in self.cache.parts():
                keys = open_part(self.cache, record).read(columns=["key"]).column("key").to_pylist()
                input_of.update(dict.fromkeys(keys, record["input"]))
            self._input_of = input_of
        if key not in self._input_of:
            raise ImageSourceError(f"key {key!r} is not in cache {self.cache.id}; pick a key that `litpipe search` printed")
        return self._input_of[key]

    def fetch(self, keys: list[str]) -> dict[str, bytes]:
        """{key: image bytes}, reading each input shard once; a key whose image is gone, or whose
        shard cannot be read now, is left out."""
        by_input: dict[str, set[str]] = {}
        for key in keys:
            by_input.setdefault(self.input_of(key), set()).add(key)
        found = {}
        for url, wanted in by_input.items():
            try:
                samples = read_shard(self.dataset, url)
            except TransientReadError:
                continue
            found.update({s.key: s.image for s in samples if s.key in wanted and s.image})
        return found
