"""Reading a cache into torch: all at once (`load_all`) or as rank-sharded batches (`StreamingReader`).

The streaming order is a pure function of (seed, epoch, rank, world_size, batch_size), so every
rank gets the same number of batches (collectives hang otherwise) and batch k can be located
without reading batches 0..k-1, which is what resuming from a step needs.
"""

from __future__ import annotations

import bisect
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from litpipe.store.cache import CacheError, EmbeddingCache, decode_embeddings
from litpipe.prefetch import prefetched

# Tensors made here over Arrow's immutable buffers are only ever read (cast or copied), never written.
warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning, __name__)

# A shuffled epoch revisits shards in random order: keep recent ones open (footer read once), but
# never one file descriptor per shard of a large cache.
MAX_OPEN_SHARDS = 64


@dataclass
class CacheContents:
    embeddings: torch.Tensor  # float32 [N, D]
    keys: list[str]
    captions: list[list[str]]
    labels: torch.Tensor | None  # int64 [N], when the dataset has labels


@dataclass
class Batch:
    embeddings: torch.Tensor  # float32 [B, D]
    captions: list[list[str]]
    keys: list[str]
    labels: torch.Tensor | None


def _has_labels(records: list[dict]) -> bool:
    """A dataset has labels when any shard has them; a shard without them reads as label -1."""
    return any("label" in r["columns"] for r in records)


def _read(parquet, record: dict, columns: list[str], group: int | None = None) -> pa.Table:
    """`columns` of one shard (or one row group of it); a missing `label` column becomes -1s."""
    present = [c for c in columns if c in record["columns"]]
    table = parquet.read(columns=present) if group is None else parquet.read_row_group(group, columns=present)
    if "label" in columns:
        labels = table.column("label") if "label" in present else pa.nulls(table.num_rows, pa.int64())
        table = table.drop_columns([c for c in ["label"] if c in present]).append_column("label", pc.fill_null(labels, -1))
    return table


def _labels(table: pa.Table) -> torch.Tensor:
    return torch.from_numpy(table.column("label").to_numpy().astype(np.int64))


def load_all(cache: EmbeddingCache, text: bool = True) -> CacheContents:
    """Every row, in shard order, into one preallocated float32 tensor: one float16->float32 pass
    per shard straight from Arrow's buffers. `text=False` skips keys and captions (they cost
    more than the vectors to turn into Python strings)."""
    records = cache.shards()
    dim = cache.dim or 0
    offsets = np.cumsum([0] + [r["rows"] for r in records])
    out = torch.empty((int(offsets[-1]), dim), dtype=torch.float32)
    with_labels = _has_labels(records)
    columns = ["embedding"] + (["key", "captions"] if text else []) + (["label"] if with_labels else [])
    progress = tqdm(total=int(offsets[-1]), unit="row", unit_scale=True, desc=f"load {cache.id}", disable=None)

    def read(i: int) -> pa.Table:
        table = _read(cache.open_shard(records[i], whole=True), records[i], columns)
        row = int(offsets[i])
        for chunk in table.column("embedding").chunks:
            vectors = torch.from_numpy(decode_embeddings(chunk, dim, cache.embedding_dtype))
            out[row:row + len(vectors)].copy_(vectors)  # torch casts float16 ~10x faster than numpy
            row += len(vectors)
        progress.update(table.num_rows)
        return table.drop_columns(["embedding"])

    # Threads overlap one shard's I/O with another's conversion; both release the GIL.
    with progress, ThreadPoolExecutor(max_workers=2) as pool:
        tables = list(pool.map(read, range(len(records))))
    rest = pa.concat_tables(tables) if tables else None
    return CacheContents(
        embeddings=out,
        keys=rest.column("key").to_pylist() if text and rest is not None else [],
        captions=rest.column("captions").to_pylist() if text and rest is not None else [],
        labels=_labels(rest) if with_labels else None,
    )


class StreamingReader:
    """This rank's batches of one epoch, shuffled deterministically and prefetched in a thread.

    The epoch's order: the cache's (shard, row group) units shuffled by (seed, epoch) and laid
    end to end; rank r takes an equal contiguous run of whole batches (the remainder is dropped,
    a different one each epoch); within the run, rows are permuted inside windows of
    `buffer_rows` (rounded up to whole batches) seeded by (seed, epoch, rank, window).
    `batch_size` is the number of rows per batch on this rank.
    """

    def __init__(self, cache: EmbeddingCache, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, start_step: int = 0,
                 buffer_rows: int = 65536, prefetch: int = 8, text: bool = True):
        if not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise CacheError(f"batch_size must be at least 1; got {batch_size}")
        self.cache, self.batch_size, self.rank = cache, batch_size, rank
        self.seed, self.epoch, self.shuffle, self.start_step = seed, epoch, shuffle, start_step
        self.prefetch, self.dim = prefetch, cache.dim
        self.records = cache.shards()
        units = [(s, g, rows) for s, r in enumerate(self.records) for g, rows in enumerate(r["row_groups"])]
        if shuffle:
            units = [units[i] for i in np.random.default_rng([seed, epoch]).permutation(len(units))]
        self.units = units
        self.unit_starts = np.cumsum([0] + [u[2] for u in units]).tolist()
        per_rank = self.unit_starts[-1] // world_size
        self.num_batches = per_rank // batch_size
        if self.num_batches == 0:
            raise CacheError(f"{cache.url}: {self.unit_starts[-1]} rows cannot give each of {world_size} rank(s) "
                             f"one batch of {batch_size}; lower the batch size")
        self.first_row = rank * per_rank
        self.window_batches = max(1, -(-buffer_rows // batch_size))
        self.columns = ["embedding", "key", "captions"] if text else ["embedding"]
        if _has_labels(self.records):
            self.columns.append("label")
        self._files: OrderedDict[int, pq.ParquetFile] = OrderedDict()  # least recently used first
        self._last_unit: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_step)

    def __iter__(self):
        return prefetched(self._batches(), self.prefetch, "litpipe-cache-prefetch")

    def _batches(self):
        """Batches start_step..num_batches-1, reading only the windows they fall in."""
        try:
            yield from self._window_batches()
        finally:  # an epoch's end or an early stop releases the shard files
            for parquet in self._files.values():
                parquet.close(force=True)
            self._files.clear()
            self._last_unit = None

    def _window_batches(self):
        B, per_window = self.batch_size, self.window_batches
        for window in range(self.start_step // per_window, -(-self.num_batches // per_window)):
            first = window * per_window
            last = min(first + per_window, self.num_batches)
            table = self._read_rows(self.first_row + first * B, self.first_row + last * B)
            # The window stays in the stored dtype (a view of Arrow's buffer when it is one chunk): each
            # batch is then one gather at half the bytes, cast to float32 as it goes.
            chunks = [torch.from_numpy(decode_embeddings(c, self.dim, self.cache.embedding_dtype))
                      for c in table.column("embedding").chunks]
            vectors = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            # Python objects once per window (cheaper than an Arrow take plus conversion per batch),
            # held in object arrays so that each batch picks its rows in one C-level gather.
            text = {c: np.fromiter(table.column(c).to_pylist(), dtype=object, count=table.num_rows)
                    for c in ("key", "captions") if c in self.columns}
            labels = _labels(table) if "label" in self.columns else None
            order = None
            if self.shuffle:
                order = torch.from_numpy(np.random.default_rng([self.seed, self.epoch, self.rank, window]).permutation(table.num_rows))
            for k in range(max(first, self.start_step), last):
                lo, hi = (k - first) * B, (k - first + 1) * B
                rows = order[lo:hi] if order is not None else torch.arange(lo, hi)
                picked = rows.numpy()
                yield Batch(
                    embeddings=(vectors.index_select(0, rows) if order is not None else vectors[lo:hi]).to(torch.float32),
                    captions=text["captions"][picked].tolist() if "captions" in text else [],
                    keys=text["key"][picked].tolist() if "key" in text else [],
                    labels=labels.index_select(0, rows) if labels is not None else None,
                )

    def _read_rows(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of the epoch's unit stream, reading each row group once."""
        parts = []
        i = bisect.bisect_right(self.unit_starts, start) - 1
        while start < stop:
            unit_start, unit_stop = self.unit_starts[i], self.unit_starts[i + 1]
            take = min(stop, unit_stop) - start
            parts.append(self._unit(i).slice(start - unit_start, take))
            start += take
            i += 1
        return pa.concat_tables(parts)

    def _unit(self, i: int) -> pa.Table:
        if self._last_unit is not None and self._last_unit[0] == i:
            return self._last_unit[1]
        shard, group, _ = self.units[i]
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            self._files[shard] = self.cache.open_shard(self.records[shard])
            if len(self._files) > MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close(force=True)
        table = _read(self._files[shard], self.records[shard], self.columns, group)
        self._last_unit = (i, table)
        return table
