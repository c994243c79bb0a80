"""Per-caption rows beside an embedding cache: fixed-width values for every caption of every image,
row-aligned with the cache's shard files (the same row groups), so the reader serves them with the vectors.

Two kinds, each in its own folder and keyed by what made them:

    {cache}/tokens/{tokenizer id}/...            caption token ids (`store.tokens.TokenCache`)
    {cache}/text_features/{text model id}/...    a frozen text model's features (`store.text_features`)

    .../manifest.json          {<what>: <fingerprint>, "complete": bool}
    .../{part name}.parquet    one row per image: a list of fixed_size_binary(width x itemsize), one per caption

The id is 16 hex of sha256 over the fingerprint, so a changed tokenizer or model never reads another's rows.
Each file is written whole and published by one atomic replace; a missing one is built again.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.store.parts import open_part
from litpipe.files import is_local, write_atomic
from litpipe.store.cache import CacheError, EmbeddingCache
from litpipe.store.fingerprint import canonical_json

MANIFEST = "manifest.json"


class CaptionRows:
    """One kind of per-caption rows of one embedding cache, made by one tokenizer or model (`fingerprint`)."""

    folder = column = made_by = ""  # set by each kind: its folder, its Parquet column, its manifest's key

    def __init__(self, cache: EmbeddingCache, fingerprint: dict, dtype: np.dtype, width: int):
        self.cache, self.fingerprint = cache, fingerprint
        self.dtype, self.width = np.dtype(dtype), width
        self.id = hashlib.sha256(canonical_json(fingerprint).encode()).hexdigest()[:16]
        self.url = f"{cache.url}/{self.folder}/{self.id}"
        self.path = f"{cache.path}/{self.folder}/{self.id}"
        self.fs = cache.fs

    @classmethod
    def find(cls, cache: EmbeddingCache, rows_id: str):
        """The rows `rows_id` of `cache` from their manifest (what made them), or None where there is none."""
        try:
            manifest = json.loads(cache.fs.cat_file(f"{cache.path}/{cls.folder}/{rows_id}/{MANIFEST}"))
        except FileNotFoundError:
            return None
        found = cls(cache, manifest[cls.made_by])
        return found if found.id == rows_id else None

    @property
    def complete(self) -> bool:
        try:
            return bool(json.loads(self.fs.cat_file(f"{self.path}/{MANIFEST}"))["complete"])
        except FileNotFoundError:
            return False

    def missing(self) -> list[dict]:
        """Shard records of the cache whose file is not written yet."""
        self.fs.invalidate_cache(self.path)
        present = set(self.fs.ls(self.path, detail=False)) if self.fs.exists(self.path) else set()
        names = {p.rsplit("/", 1)[-1] for p in present}
        return [r for r in self.cache.parts() if file_name(r) not in names]

    def write(self, record: dict, values: np.ndarray, counts: np.ndarray) -> None:
        """One shard file's rows: `values` [captions, width] in row order, `counts` captions per row (at
        least 1: a row without captions holds the empty text's); row groups as the shard's, so readers
        fetch the same units."""
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        if offsets[-1] != len(values) or len(counts) != record["rows"] or values.shape[1:] != (self.width,):
            raise CacheError(f"{self.folder} file of {record['path']}: {len(counts)} rows and {len(values)} captions of "
                             f"width {values.shape[1:]} do not match the shard's {record['rows']} rows of {self.width}")
        blobs = pa.FixedSizeBinaryArray.from_buffers(pa.binary(self.width * self.dtype.itemsize), len(values),
                                                      [None, pa.py_buffer(np.ascontiguousarray(values, self.dtype))])
        table = pa.table({self.column: pa.ListArray.from_arrays(pa.array(offsets), blobs)})
        sink = io.BytesIO()
        writer = pq.ParquetWriter(sink, table.schema, compression="none", use_dictionary=False, write_statistics=False)
        start = 0
        for rows in record["row_groups"]:
            writer.write_table(table.slice(start, rows), row_group_size=max(rows, 1))
            start += rows
        writer.close()
        self.fs.makedirs(self.path, exist_ok=True)
        write_atomic(self.fs, f"{self.path}/{file_name(record)}", sink.getvalue())

    def build(self, record: dict, encode) -> int:
        """Write one shard file's rows: `encode(texts)` -> [texts, width] over every caption of every row, in
        row order (a row without captions holds the empty text's); the rows written."""
        captions = open_part(self.cache, record).read(columns=["captions"]).column("captions").to_pylist()
        per_row = [c if c else [""] for c in captions]
        values = np.asarray(encode([text for texts in per_row for text in texts]))
        self.write(record, values.astype(self.dtype), np.array([len(texts) for texts in per_row]))
        return len(per_row)

    def finalize(self) -> None:
        if self.missing():
            raise CacheError(f"{self.url}: {self.folder} files are missing; rebuild them (litpipe train does)")
        self.fs.makedirs(self.path, exist_ok=True)
        write_atomic(self.fs, f"{self.path}/{MANIFEST}",
                     json.dumps({self.made_by: self.fingerprint, "complete": True}, indent=1).encode())

    def open_file(self, record: dict) -> pq.ParquetFile:
        path = f"{self.path}/{file_name(record)}"
        local = is_local(self.fs)
        try:
            return pq.ParquetFile(path if local else pa.BufferReader(self.fs.cat_file(path)), memory_map=local)
        except FileNotFoundError:
            raise CacheError(f"{self.url}: no {self.folder} file for {record['path']}; rebuild them "
                             f"(litpipe train builds what is missing)") from None

    def rows(self, parquet: pq.ParquetFile, group: int) -> tuple[np.ndarray, np.ndarray]:
        """One row group of a file: (values [captions, width], offsets [rows + 1]) as views of Arrow's buffers."""
        column = parquet.read_row_group(group, columns=[self.column]).column(self.column).combine_chunks()
        blobs = column.values
        values = np.frombuffer(blobs.buffers()[1], self.dtype, count=len(blobs) * self.width,
                               offset=blobs.offset * blobs.type.byte_width).reshape(-1, self.width)
        offsets = np.frombuffer(column.buffers()[1], np.int32, count=len(column) + 1, offset=column.offset * 4)
        return values, offsets - offsets[0]


def file_name(record: dict) -> str:
    """A shard file's rows file: named by the part and its data file's sha256, so a part written
    again (finalize drops a repeated key from it) gets rows of its own, never stale ones."""
    return f"{record['name']}.{record['sha256'][:16]}.parquet"


def pick_captions(counts, seed: int, step: int, rank: int) -> np.ndarray:
    """Which caption each row trains with at this step (0 for a row without captions): seeded by
    (seed, step, rank), so a resumed run and the tokenise-on-the-fly path pick what the cached-rows
    path picks."""
    return np.random.default_rng([seed, step, rank]).integers(0, np.maximum(np.asarray(counts), 1))
