"""Work over many parts of a cache, spread where the process can spread it: as Ray tasks when it has
joined a cluster (precompute's finalize: the driver's CPU and memory then stay flat as parts grow),
else in threads here (a store command: parts are read over the network, so threads overlap the waits).

Ray is never imported or started here; a memory:// store lives in this process only, so it stays here.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

from litpipe.store.cache import EmbeddingCache

THREADS = 16  # parts worked on at once in this process: on an object store each is a round trip or two
PARTS_PER_TASK = 16  # parts one Ray task works on: a task costs a few ms to schedule
TASKS_UNDER_WAY = 256  # Ray tasks pending at once: a cluster's CPUs kept busy, their calls and outputs bounded


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
    """[fn(cache, *args) for args in calls], in order (`spread_as_done`, gathered)."""
    outputs = [None] * len(calls)
    for i, output in spread_as_done(cache, fn, calls):
        outputs[i] = output
    return outputs


def spread_as_done(cache: EmbeddingCache, fn, calls: Iterable[tuple]) -> Iterator[tuple[int, object]]:
    """(i, fn(cache, *args)) for the i-th args of `calls`, as each ends: over Ray tasks of
    PARTS_PER_TASK calls when this process has joined a cluster, else in THREADS threads. Calls start
    as others end, a bounded number under way, so what this process holds (the calls sent, the outputs
    back) is the same at a thousand parts as at a million, and no call waits for a slow one to start.
    A failure is raised once every call under way has ended (none starts after it), so none is still
    writing when the caller handles it."""
    ray = joined_ray(cache)
    if ray is None:
        with ThreadPoolExecutor(THREADS) as pool:
            yield from _as_done(calls, 1, 4 * THREADS, lambda chunk: pool.submit(_run_calls, fn, cache, chunk),
                                lambda pending, every: futures.wait(pending, return_when=futures.ALL_COMPLETED if every
                                                                    else futures.FIRST_COMPLETED)[0],
                                lambda future: future.result())
        return
    task, light = ray.remote(_run_calls), bare(cache)
    yield from _as_done(calls, PARTS_PER_TASK, TASKS_UNDER_WAY, lambda chunk: task.remote(fn, light, chunk),
                        lambda pending, every: ray.wait(pending, num_returns=len(pending) if every else 1)[0], ray.get)


def _as_done(calls: Iterable[tuple], per_task: int, under_way: int, submit, wait, get) -> Iterator[tuple[int, object]]:
    """`spread_as_done`'s scheduling, the same for tasks and threads: `submit` chunks of `per_task` calls
    while fewer than `under_way` are pending; `wait(pending, every)` returns those ended (one at least,
    or all); `get` a chunk's outputs."""
    numbered, pending = enumerate(calls), {}
    try:
        while True:
            while len(pending) < under_way and (chunk := list(itertools.islice(numbered, per_task))):
                pending[submit([args for _, args in chunk])] = chunk[0][0]
            if not pending:
                return
            for handle in wait(list(pending), False):
                first = pending.pop(handle)
                yield from enumerate(get(handle), first)
    except Exception:
        if pending:
            wait(list(pending), True)
        raise


def _run_calls(fn, cache: EmbeddingCache, calls: list[tuple]) -> list:
    return [fn(cache, *args) for args in calls]
