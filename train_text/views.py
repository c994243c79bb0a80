"""`train.view`: the cache view a run trains on, built from its rule on the driver's side of the run."""

from __future__ import annotations

import fsspec

from litpipe.config import ConfigError, PipelineConfig
from litpipe.scoring.near_duplicates import near_duplicates
from litpipe.store import EmbeddingCache, load_all, resolve_cache
from litpipe.store.views import CacheView


def build_view(cfg: PipelineConfig, cache: EmbeddingCache) -> CacheView | None:
    """The rows `train.view` leaves out of `cache`: listed keys, keys outside `include_keys`, and images
    that near-duplicate one of the named datasets' images (cosine >= threshold on the cached vectors)."""
    view = cfg.train.view
    if view is None:
        return None
    rule = view.model_dump(mode="json", exclude={"name"})
    excluded = set(_keys(view.exclude_keys, "exclude_keys"))
    if view.include_keys is not None or view.near_duplicates_of:
        contents = load_all(cache)
        if view.include_keys is not None:
            kept = set(_keys(view.include_keys, "include_keys"))
            excluded |= {key for key in contents.keys if key not in kept}
        for name in view.near_duplicates_of:
            if name not in cfg.data:
                raise ConfigError(f"train.view.near_duplicates_of: no dataset `{name}` under data; known: {', '.join(cfg.data)}")
            other = load_all(resolve_cache(cfg, name, None), text=False).embeddings
            hit = near_duplicates(contents.embeddings, other, view.threshold)
            excluded |= {key for key, near in zip(contents.keys, hit) if near}
    return CacheView(view.name, frozenset(excluded), rule)


def _keys(source: str | list[str] | None, key: str) -> list[str]:
    if source is None or isinstance(source, list):
        return source or []
    try:
        with fsspec.open(source, "rt", encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ConfigError(f"train.view.{key}: {source}: no such file (one key per line)") from None
