"""Work over many parts of a cache, spread where the process can spread it: as Ray tasks when it has
joined a cluster (precompute's finalize: the driver's CPU and memory then stay flat as parts grow),
else in threads here (a store command: parts are read over the network, so threads overlap the waits).

Ray is never imported or started here; a memory:// store lives in this process only, so it stays here.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from litpipe.store.cache import EmbeddingCache

THREADS = 16  # parts worked on at once in this process: on an object store each is a round trip or two
PARTS_PER_TASK = 16  # parts one Ray task works on: a task costs a few ms to schedule


def joined_ray(cache: EmbeddingCache):
    """Ray, when this process has joined a cluster and its workers can reach the cache; else None."""
    ray = sys.modules.get("ray")
    protocols = cache.fs.protocol
    reachable = "memory" not in ((protocols,) if isinstance(protocols, str) else protocols)
    return ray if ray is not None and ray.is_initialized() and reachable else None


def bare(cache: EmbeddingCache) -> EmbeddingCache:
    """What a task needs of a cache to open its parts: its store and manifest, less the part records
    (those this process has read, and a complete cache's every one: about a kilobyte a part, pickled,
    sent with each task otherwise, so a pass over N parts moved N^2 of them)."""
    return EmbeddingCache(cache.url, cache.manifest)


def spread(cache: EmbeddingCache, fn, calls: list[tuple]) -> list:
    """[fn(cache, *args) for args in calls], in order: over Ray tasks of PARTS_PER_TASK calls each when
    this process has joined a cluster, else in THREADS threads. A failure is raised once every call
    has ended, so none is still writing when the caller handles it."""
    ray = joined_ray(cache)
    if ray is None:
        with ThreadPoolExecutor(THREADS) as pool:
            return list(pool.map(lambda args: fn(cache, *args), calls))
    task, light = ray.remote(_run_calls), bare(cache)
    chunks = [calls[i:i + PARTS_PER_TASK] for i in range(0, len(calls), PARTS_PER_TASK)]
    refs = [task.remote(fn, light, chunk) for chunk in chunks]
    try:
        return [out for outs in ray.get(refs) for out in outs]
    except Exception:
        ray.wait(refs, num_returns=len(refs))
        raise


def _run_calls(fn, cache: EmbeddingCache, calls: list[tuple]) -> list:
    return [fn(cache, *args) for args in calls]
