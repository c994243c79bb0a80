"""Keys repeated across input shards: the first in input order is kept, each later one is skipped.

Crawls that were merged or re-run hold the same `__key__` in several shards. A read task sees one
shard (it applies the rule inside it, `sources.iter_shard`) and encoder actors commit parts in any
order, so across shards the rule is applied to the committed parts, whose order (input, part, row)
is fixed: `commits.finalize` rewrites each part holding a later copy without it and records
that copy as skipped ("duplicate key: first in SHARD"). Readers, exports and verify then see each key
once, and a resumed or re-planned run finalizes to the same rows.

The pass is a hash shuffle, so no process holds every key: map tasks read the key columns of a run
of parts (one small column chunk a part) and split their (key, ordinal) rows into buckets by a hash
of the key; one reduce task a bucket groups its keys in Arrow and returns the later copies alone.
When this process has joined a Ray cluster (precompute's finalize) the tasks are Ray tasks and the
buckets travel through the object store: the driver holds object refs and the duplicates, never
the keys (grouped on the driver, a billion 20-byte keys were some 36 GB). Without Ray (a store
command, a migration) the same functions run here one after the other, the buckets spilled to a
local temporary folder, so this process holds one map task's keys and then one bucket's.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from litpipe.store.cache import EmbeddingCache
from litpipe.store.parts import open_part, read_part
from litpipe.store.records import PartRecords
from litpipe.store.tasks import THREADS, bare, joined_ray

KEYS_PER_BUCKET = 4_000_000  # keys one reduce task groups: ~150 MB at 20-byte keys
MIN_KEYS_PER_MAP = 262_144  # a map task reads parts until it holds this many keys...
MIN_KEYS_PER_OUTPUT = 8_192  # ...and this many per bucket: Ray keeps objects under 100 kB in their owner, the driver
SCHEMA = pa.schema([("key", pa.string()), ("ordinal", pa.int64())])
KEY_FIELDS = ("name", "path", "owner", "rows")  # what a map task reads of a part's record (`parts.open_part`)


def later_duplicates(cache: EmbeddingCache, records: list[dict]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{index in `records` of a part holding later copies: (their rows, ascending; the index of the
    part holding each one's first copy)}, as arrays: 12 bytes a copy, not a Python tuple's ~100;
    `records` in input order, as `EmbeddingCache.parts()` lists them."""
    if not records:
        return {}
    # Two buckets at least: with one, Ray would return a map task's list of outputs as one object.
    buckets = max(2, -(-sum(r["rows"] for r in records) // KEYS_PER_BUCKET))
    tasks = map_tasks(records, max(MIN_KEYS_PER_MAP, buckets * MIN_KEYS_PER_OUTPUT))
    ray = joined_ray(cache)
    if ray is None:
        with tempfile.TemporaryDirectory(prefix="litpipe-keys-") as folder:
            spilled = spill(folder, (bucket_keys(cache, first, chunk, buckets) for first, chunk in tasks), buckets)
            found = [later_in_bucket(read_spilled(path)) for path in spilled]
    else:
        split = ray.remote(bucket_keys).options(num_returns=buckets)
        light = bare(cache)
        mapped = [split.remote(light, first, chunk, buckets) for first, chunk in tasks]
        reduce = ray.remote(later_in_bucket)
        found = ray.get([reduce.remote(*(outputs[b] for outputs in mapped)) for b in range(buckets)])
    ordinals = np.concatenate([o for o, _ in found])
    order = np.argsort(ordinals)
    ordinals, firsts = ordinals[order], np.concatenate([f for _, f in found])[order] >> 32
    parts, starts = np.unique(ordinals >> 32, return_index=True)
    return {int(part): (rows & 0xFFFFFFFF, first.astype(np.int32))
            for part, rows, first in zip(parts, np.split(ordinals, starts[1:]), np.split(firsts, starts[1:]))}


def map_tasks(records: PartRecords, keys_per_task: int) -> list[tuple[int, PartRecords]]:
    """Runs of consecutive parts of about `keys_per_task` rows: (index of the first, their records less
    what reading keys does not need: a run's driver sends every part's record to these tasks at once,
    and the skip records and row-group counts were most of their bytes)."""
    tasks, start, rows, run = [], 0, 0, []
    for i, record in enumerate(records):
        rows += record["rows"]
        run.append({k: record[k] for k in KEY_FIELDS if k in record})
        if rows >= keys_per_task or i == len(records) - 1:
            tasks.append((start, PartRecords.of(run)))
            start, rows, run = i + 1, 0, []
    return tasks


def bucket_keys(cache: EmbeddingCache, first: int, records: list[dict], buckets: int) -> list[pa.Table]:
    """The map: parts `records` (the first at index `first`) -> one (key, ordinal) table per bucket.

    ordinal = part index << 32 | row, so its minimum over a key is the key's first copy in input
    order. The bucket is the key's CRC-32: the same in every process (Python's hash is not).
    """
    def keys(record: dict) -> pa.Array:
        return read_part(cache, open_part(cache, record), record, ["key"]).column("key").combine_chunks()

    with ThreadPoolExecutor(THREADS) as pool:  # key columns: on an object store each is a round trip or two
        columns = list(pool.map(keys, records))
    ordinals = np.concatenate([(np.int64(first + i) << 32) + np.arange(len(c), dtype=np.int64) for i, c in enumerate(columns)])
    table = pa.table({"key": pa.chunked_array(columns, pa.string()), "ordinal": ordinals}, schema=SCHEMA)
    bucket = np.fromiter((zlib.crc32(key.encode()) for key in table["key"].to_pylist()), np.int64, table.num_rows) % buckets
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    return [table.take(order[bounds[b]:bounds[b + 1]]) for b in range(buckets)]


def spill(folder: str, mapped, buckets: int) -> list[str]:
    """Each map output's buckets appended to one Arrow IPC file a bucket in `folder` (local disk): a
    process without Ray holds one map task's keys, then one bucket's, never every key."""
    paths = [os.path.join(folder, f"bucket-{b:05d}.arrow") for b in range(buckets)]
    writers = [pa.ipc.new_file(path, SCHEMA) for path in paths]
    try:
        for outputs in mapped:
            for writer, table in zip(writers, outputs):
                writer.write_table(table)
    finally:
        for writer in writers:
            writer.close()
    return paths


def read_spilled(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()


def later_in_bucket(*tables: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The reduce: one bucket's (key, ordinal) rows -> (ordinal of each later copy, ordinal of its first copy)."""
    table = pa.concat_tables(tables)
    grouped = table.group_by("key", use_threads=False).aggregate([("ordinal", "min"), ("ordinal", "count")])
    repeated = grouped.filter(pc.greater(grouped["ordinal_count"], 1)).select(["key", "ordinal_min"])
    copies = table.join(repeated, "key", join_type="inner", use_threads=False)
    copies = copies.filter(pc.not_equal(copies["ordinal"], copies["ordinal_min"]))
    return copies["ordinal"].to_numpy(), copies["ordinal_min"].to_numpy()
