"""Looking after a cache: `verify` re-reads every part against its record, `orphans` lists the files no
reader will look at (a crashed or losing writer's), `remove_orphans` deletes those that can no longer
be committed. Removal of whole caches and parts, by reference, is `sharing.py`'s."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.files import TEMP_MARK, ls_or_empty, to_url
from litpipe.store.cache import EmbeddingCache, _join, decode_embeddings, list_caches, referenced_files, stored_dim
from litpipe.store.duplicates import later_duplicates
from litpipe.store.parts import open_part, read_part
from litpipe.store.tasks import spread


def verify(cache: EmbeddingCache) -> list[str]:
    """Re-read every shard (spread over Ray tasks or threads, `tasks.spread`); each problem names its
    file. Empty = good. A key in several parts is one only in a complete cache: a partial one keeps
    every copy until `finalize` drops the later."""
    records = cache.parts()
    found = spread(cache, part_problems, [(record,) for record in records])
    problems = [p for part, _ in found for p in part]
    if cache.complete:  # a partial cache's copies wait for finalize; a part that does not read is named above
        problems += duplicate_keys(cache, [r for r, (_, readable) in zip(records, found) if readable])
    for path in orphans(cache):
        what = ("temporary file of a writer killed before its rename" if TEMP_MARK in path else
                "orphaned data file, in no commit record (a crashed or losing writer)")
        problems.append(f"{_join(cache.url, path)}: {what}; `litpipe cache rm {cache.id} --orphans` deletes it")
    return problems


def part_problems(cache: EmbeddingCache, record: dict) -> tuple[list[str], bool]:
    """One part's file against its record: bytes, sha256, page CRCs, rows, dim, NaN/inf; and whether
    it reads as Parquet (so its keys can be checked)."""
    url = cache.file_url(record)
    try:
        blob = cache.fs.cat_file(cache.file_path(record))
    except FileNotFoundError:
        return [f"{url}: committed shard is missing"], False
    problems = []
    if len(blob) != record["bytes"]:
        problems.append(f"{url}: {len(blob)} bytes, its commit record says {record['bytes']} (truncated or replaced)")
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        problems.append(f"{url}: sha256 differs from its commit record (corrupted or replaced)")
    try:
        table = pq.read_table(pa.BufferReader(blob), page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as err:
        return problems + [f"{url}: unreadable Parquet ({err})"], False
    if table.num_rows != record["rows"]:
        problems.append(f"{url}: {table.num_rows} rows, its commit record says {record['rows']}")
    dim = stored_dim(table.schema.field("embedding"), cache.embedding_dtype)
    if dim != cache.dim:
        return problems + [f"{url}: embedding dim {dim}, the cache's is {cache.dim}"], True
    vectors = decode_embeddings(table.column("embedding"), dim, cache.embedding_dtype)
    bad = int(table.num_rows - np.isfinite(vectors).all(axis=1).sum())
    if bad:
        problems.append(f"{url}: {bad} embedding(s) with NaN or inf")
    return problems, True


def duplicate_keys(cache: EmbeddingCache, records: list[dict]) -> list[str]:
    """A key in two parts of a complete cache (kept by a litpipe before duplicates were dropped),
    found by the store's own duplicate pass: no key set held here."""
    problems = []
    for i, (rows, firsts) in sorted(later_duplicates(cache, records).items()):
        keys = read_part(cache, open_part(cache, records[i]), records[i], ["key"]).column("key")
        problems += [f"{cache.file_url(records[i])}: key {keys[row].as_py()!r} also in {records[first]['path']} (duplicate key)"
                     for row, first in zip(rows.tolist(), firsts.tolist())]
    return problems


def orphans(cache: EmbeddingCache) -> list[str]:
    """Files no reader will look at (paths relative to the cache folder): data files under shards/
    that no commit record names, neither this cache's nor one of another cache that adopted them;
    and temporary files (`*.tmp-*`) a writer killed between writing and renaming left.

    While a writer runs, its in-flight files show here too until it commits.
    """
    cache.fs.invalidate_cache(cache.path)
    listed = {folder: [os.path.basename(p) for p in ls_or_empty(cache.fs, _join(cache.path, folder) if folder else cache.path)]
              for folder in ("", "shards", "commits")}
    committed = {s["path"] for s in cache.parts() if cache.owner(s) == cache.id}
    committed |= {path for owner, path in referenced_files(list_caches(to_url(cache.fs, cache.root))) if owner == cache.id}
    data = [p for p in (f"shards/{name}" for name in listed["shards"]) if p not in committed]
    temps = [f"{folder}/{name}".lstrip("/") for folder, names in listed.items() for name in names if TEMP_MARK in name]
    return sorted(set(data + temps))


def remove_orphans(cache: EmbeddingCache) -> list[str]:
    """Delete orphans that can no longer be committed: all of them in a complete cache, else
    those of a part already committed (a race loser or a crashed earlier attempt)."""
    committed_names = {s["name"] for s in cache.parts()}
    removed = [p for p in orphans(cache) if cache.complete or
               (p.startswith(("shards/", "commits/")) and os.path.basename(p).split(".")[0] in committed_names)]
    for path in removed:
        cache.fs.rm_file(_join(cache.path, path))
    return removed
