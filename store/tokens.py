"""The token cache: every caption of an embedding cache tokenised once, kept beside it per tokenizer.

Captions as Python strings, tokenised every step of every epoch, made the trainer's input path
4x slower than the vectors. A token cache holds each committed shard file's caption token ids,
row-aligned with it (the same row groups), so the reader serves fixed-width integer arrays:

    {cache}/tokens/{tokenizer id}/manifest.json       {"tokenizer": <fingerprint>, "complete": bool}
    {cache}/tokens/{tokenizer id}/{part name}.parquet one row per image: `tokens`, a list of
                                                      fixed_size_binary(context x 4): int32 ids per caption

The tokenizer id is 16 hex of sha256 over its fingerprint (vocabulary and merges, special tokens,
context length, and the text cleaning that runs before it: open_clip's cleaning code and the ftfy it
calls), so a changed tokenizer, or a newer open_clip that cleans differently, never reads another's ids. Each file is
written whole and published by one atomic replace; a missing one is built again.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.files import is_local, write_atomic
from litpipe.store.cache import CacheError, EmbeddingCache
from litpipe.store.fingerprint import canonical_json

MANIFEST = "manifest.json"


class TokenCache:
    """The token ids of one embedding cache's captions under one tokenizer."""

    def __init__(self, cache: EmbeddingCache, fingerprint: dict):
        self.cache, self.fingerprint = cache, fingerprint
        self.context_length = int(fingerprint["context_length"])
        self.id = hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:16]
        self.url = f"{cache.url}/tokens/{self.id}"
        self.path = f"{cache.path}/tokens/{self.id}"
        self.fs = cache.fs

    @property
    def complete(self) -> bool:
        try:
            return bool(json.loads(self.fs.cat_file(f"{self.path}/{MANIFEST}"))["complete"])
        except FileNotFoundError:
            return False

    def missing(self) -> list[dict]:
        """Shard records of the cache whose token file is not written yet."""
        self.fs.invalidate_cache(self.path)
        present = set(self.fs.ls(self.path, detail=False)) if self.fs.exists(self.path) else set()
        names = {p.rsplit("/", 1)[-1] for p in present}
        return [r for r in self.cache.shards() if file_name(r) not in names]

    def write(self, record: dict, ids: np.ndarray, counts: np.ndarray) -> None:
        """One shard file's token ids: `ids` [captions, context] int32 in row order, `counts`
        captions per row (at least 1: a row without captions holds the empty text's ids); row
        groups as the shard's, so readers fetch the same units."""
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        if offsets[-1] != len(ids) or len(counts) != record["rows"]:
            raise CacheError(f"token file of {record['path']}: {len(counts)} rows and {len(ids)} captions do not "
                             f"match the shard's {record['rows']} rows")
        values = pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.context_length * 4), len(ids),
                                                       [None, pa.py_buffer(np.ascontiguousarray(ids, np.int32))])
        table = pa.table({"tokens": pa.ListArray.from_arrays(pa.array(offsets), values)})
        sink = io.BytesIO()
        writer = pq.ParquetWriter(sink, table.schema, compression="none", use_dictionary=False, write_statistics=False)
        start = 0
        for rows in record["row_groups"]:
            writer.write_table(table.slice(start, rows), row_group_size=max(rows, 1))
            start += rows
        writer.close()
        self.fs.makedirs(self.path, exist_ok=True)
        write_atomic(self.fs, f"{self.path}/{file_name(record)}", sink.getvalue())

    def finalize(self) -> None:
        if self.missing():
            raise CacheError(f"{self.url}: token files are missing; rebuild them (litpipe train does)")
        self.fs.makedirs(self.path, exist_ok=True)
        write_atomic(self.fs, f"{self.path}/{MANIFEST}",
                     json.dumps({"tokenizer": self.fingerprint, "complete": True}, indent=1).encode())

    def open_file(self, record: dict) -> pq.ParquetFile:
        path = f"{self.path}/{file_name(record)}"
        local = is_local(self.fs)
        try:
            return pq.ParquetFile(path if local else pa.BufferReader(self.fs.cat_file(path)), memory_map=local)
        except FileNotFoundError:
            raise CacheError(f"{self.url}: no token file for {record['path']}; rebuild the token cache "
                             "(litpipe train builds what is missing)") from None


def file_name(record: dict) -> str:
    """A shard file's token file: named by the part and its data file's sha256, so a part written
    again (finalize drops a repeated key from it) gets token rows of its own, never stale ones."""
    return f"{record['name']}.{record['sha256'][:16]}.parquet"


def token_rows(parquet: pq.ParquetFile, group: int) -> tuple[np.ndarray, np.ndarray]:
    """One row group of a token file: (ids [captions, context] int32, offsets [rows + 1]) as views."""
    column = parquet.read_row_group(group, columns=["tokens"]).column("tokens").combine_chunks()
    values = column.values
    context = values.type.byte_width // 4
    ids = np.frombuffer(values.buffers()[1], np.int32, count=len(values) * context,
                        offset=values.offset * values.type.byte_width).reshape(-1, context)
    offsets = np.frombuffer(column.buffers()[1], np.int32, count=len(column) + 1, offset=column.offset * 4)
    return ids, offsets - offsets[0]


def pick_captions(counts, seed: int, step: int, rank: int) -> np.ndarray:
    """Which caption each row trains with at this step (0 for a row without captions): seeded by
    (seed, step, rank), so a resumed run and the tokenise-on-the-fly path pick what the token
    cache path picks."""
    return np.random.default_rng([seed, step, rank]).integers(0, np.maximum(np.asarray(counts), 1))
