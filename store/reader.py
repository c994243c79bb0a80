"""Reading a cache into torch: all at once (`load_all`) or as rank-sharded batches (`StreamingReader`).

The streaming order is a pure function of (seed, epoch, rank, world_size, batch_size), so every
rank gets the same number of batches (collectives hang otherwise) and batch k can be located
without reading batches 0..k-1, which is what resuming from a step needs.
"""

from __future__ import annotations

import bisect
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from litpipe.progress import progress

from litpipe.store.parts import open_part, read_part
from litpipe.store.cache import CacheError, EmbeddingCache, decode_embeddings
from litpipe.store.caption_rows import CaptionRows, pick_captions
from litpipe.store.views import CacheView
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
    # Rows of a token or text-feature cache (`per_caption`): each row's caption of this step [B, width], or with
    # `all_captions` every caption of every row [T, width] and `owner` [T], each one's row in the batch.
    per_caption: torch.Tensor | None = None
    owner: torch.Tensor | None = None


def _has_labels(records: list[dict]) -> bool:
    """A dataset has labels when any shard has them; a shard without them reads as label -1."""
    return any("label" in r["columns"] for r in records)


def _read(cache: EmbeddingCache, parquet, record: dict, columns: list[str], group: int | None = None) -> pa.Table:
    """`columns` of one shard (or one row group of it); a missing `label` column becomes -1s."""
    present = [c for c in columns if c in record["columns"]]
    table = read_part(cache, parquet, record, present, group)
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
    records = cache.parts()
    dim = cache.dim or 0
    offsets = np.cumsum([0] + [r["rows"] for r in records])
    out = torch.empty((int(offsets[-1]), dim), dtype=torch.float32)
    with_labels = _has_labels(records)
    columns = ["embedding"] + (["key", "captions"] if text else []) + (["label"] if with_labels else [])
    bar = progress(total=int(offsets[-1]), unit="row", unit_scale=True, desc=f"load {cache.id}", disable=None)

    def read(i: int) -> pa.Table:
        table = _read(cache, open_part(cache, records[i], whole=True), records[i], columns)
        row = int(offsets[i])
        for chunk in table.column("embedding").chunks:
            vectors = torch.from_numpy(decode_embeddings(chunk, dim, cache.embedding_dtype))
            out[row:row + len(vectors)].copy_(vectors)  # torch casts float16 ~10x faster than numpy
            row += len(vectors)
        bar.update(table.num_rows)
        return table.drop_columns(["embedding"])

    # Threads overlap one shard's I/O with another's conversion; both release the GIL.
    with bar, ThreadPoolExecutor(max_workers=2) as pool:
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

    The epoch's order: the cache's units (a row group of one shard file: rows of one input shard)
    are shuffled by (seed, epoch) and taken `shuffle_row_groups` at a time; the rows of such a group are
    shuffled together, seeded by (seed, epoch, group), and the groups are laid end to end. Rank r
    takes an equal contiguous run of whole batches (the remainder is dropped, a different one each
    epoch). So every batch draws from `shuffle_row_groups` input shards at once (web datasets are sharded by
    crawl order or source: in-batch negatives need the mix), batch k is found without reading the
    ones before it, and memory holds about two groups: 2 x shuffle_row_groups x row-group rows.
    `batch_size` is the number of rows per batch on this rank. Rows without a caption (images of a
    classification set) are no image-text pairs and are left out; `uncaptioned` counts them. A
    `view` leaves out its keys' rows the same way (the cache is never rewritten).
    """

    def __init__(self, cache: EmbeddingCache, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, start_step: int = 0,
                 shuffle_row_groups: int = 16, prefetch: int = 8, text: bool = True, per_caption: CaptionRows | None = None,
                 all_captions: bool = False, view: CacheView | None = None):
        if not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or shuffle_row_groups < 1:
            raise CacheError(f"batch_size and shuffle_row_groups must be at least 1; got {batch_size} and {shuffle_row_groups}")
        self.cache, self.batch_size, self.rank = cache, batch_size, rank
        self.seed, self.epoch, self.shuffle, self.start_step = seed, epoch, shuffle, start_step
        self.prefetch, self.dim, self.per_caption, self.all_captions = prefetch, cache.dim, per_caption, all_captions
        self.records = cache.parts()
        self.left_out = view.rows_left_out(cache, self.records) if view else {}
        # A row without a caption (an image of a classification set) is no image-text pair: left out, as a view's rows.
        units = [(s, g, rows - _uncaptioned(r, g) - len(self.left_out.get((s, g), ())))
                 for s, r in enumerate(self.records) for g, rows in enumerate(r["row_groups"])]
        self.uncaptioned = cache.uncaptioned
        if shuffle:
            units = [units[i] for i in np.random.default_rng([seed, epoch]).permutation(len(units))]
        size = shuffle_row_groups if shuffle else 1
        self.groups = [units[i:i + size] for i in range(0, len(units), size)]
        self.group_starts = np.cumsum([0] + [sum(u[2] for u in g) for g in self.groups]).tolist()
        per_rank = self.group_starts[-1] // world_size
        self.num_batches = per_rank // batch_size
        if self.num_batches == 0:
            without = f" ({self.uncaptioned} more have no caption)" if self.uncaptioned else ""
            raise CacheError(f"{cache.url}: {self.group_starts[-1]} rows with captions{without} cannot give each of "
                             f"{world_size} rank(s) one batch of {batch_size}; lower the batch size, or train on a "
                             "dataset with captions")
        self.first_row = rank * per_rank
        self.columns = ["embedding", "key", "captions"] if text else ["embedding"]
        if _has_labels(self.records):
            self.columns.append("label")
        self._files: OrderedDict[tuple, pq.ParquetFile] = OrderedDict()  # least recently used first
        self._loaded: dict[int, _Group] = {}
        self._ahead: dict[int, Future] = {}  # the next group, being read

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_step)

    def __iter__(self):
        return prefetched(self._batches(), self.prefetch, "litpipe-cache-prefetch")

    def _batches(self):
        """Batches start_step..num_batches-1, reading only the groups they fall in."""
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="litpipe-cache-read")
        try:
            for k in range(self.start_step, self.num_batches):
                yield self._batch(self.first_row + k * self.batch_size, self.epoch * self.num_batches + k)
        finally:  # an epoch's end or an early stop releases the loader and the shard files
            self._loader.shutdown(wait=True, cancel_futures=True)
            for parquet in self._files.values():
                parquet.close(force=True)
            self._files.clear()
            self._loaded.clear()
            self._ahead.clear()

    def _batch(self, start: int, step: int) -> Batch:
        """Rows [start, start + batch_size) of the epoch's order; `step` (the global step, counting
        epochs of this reader's length) picks each row's caption from the per-caption cache.

        The rows are gathered unit by unit, straight from each unit's Arrow buffers, and the batch
        lists them unit by unit (the batch is a random set of rows; the loss does not depend on
        their order within it), so each column is a few contiguous gathers.
        """
        pieces, filled = [], 0  # (unit, rows of the unit)
        i = bisect.bisect_right(self.group_starts, start) - 1
        while filled < self.batch_size:
            offset = start + filled - self.group_starts[i]
            take = min(self.batch_size - filled, self.group_starts[i + 1] - self.group_starts[i] - offset)
            group = self._group(i)
            rows = np.sort(group.order[offset:offset + take])  # sorted rows fall unit by unit
            units = np.searchsorted(group.starts, rows, side="right") - 1
            cuts = np.flatnonzero(np.diff(units)) + 1
            for u, unit_rows in zip(units[np.r_[0, cuts]], np.split(rows, cuts)):
                pieces.append((group.units[u], unit_rows - group.starts[u]))
            filled += take
            i += 1
        vectors = torch.cat([unit.vectors.index_select(0, torch.from_numpy(rows)) for unit, rows in pieces])
        text = {c: np.concatenate([unit.text[c][rows] for unit, rows in pieces]).tolist() for c in pieces[0][0].text}
        labels = torch.cat([unit.labels.index_select(0, torch.from_numpy(rows)) for unit, rows in pieces]) \
            if "label" in self.columns else None
        per_caption = owner = None
        if self.per_caption is not None:
            counts = np.concatenate([unit.caption_offsets[rows + 1] - unit.caption_offsets[rows] for unit, rows in pieces])
            if self.all_captions:
                per_caption = np.concatenate([unit.caption_values[_every_caption(unit.caption_offsets, rows)]
                                              for unit, rows in pieces])
                owner = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
            else:
                picks = np.split(pick_captions(counts, self.seed, step, self.rank),
                                 np.cumsum([len(r) for _, r in pieces[:-1]]))
                per_caption = np.concatenate([unit.caption_values[unit.caption_offsets[rows] + pick]
                                              for (unit, rows), pick in zip(pieces, picks)])
            per_caption = torch.from_numpy(per_caption)
        return Batch(embeddings=vectors.to(torch.float32), captions=text.get("captions", []), keys=text.get("key", []),
                     labels=labels, per_caption=per_caption, owner=owner)

    def _group(self, i: int) -> _Group:
        """Group i's units in memory (read once; groups before it are let go), with its row order.

        Groups are read by one loader thread, group i + 1 while batches of group i are gathered: the
        read (Parquet pages, their CRC checks) overlaps the gathering, and only that thread opens files.
        """
        if i not in self._loaded:
            for old in [j for j in self._loaded if j < i]:
                del self._loaded[old]
            self._loaded[i] = (self._ahead.pop(i, None) or self._loader.submit(self._load, i)).result()
            if i + 1 < len(self.groups) and i + 1 not in self._ahead:
                self._ahead[i + 1] = self._loader.submit(self._load, i + 1)
        return self._loaded[i]

    def _load(self, i: int) -> _Group:
        units = [self._unit(shard, group) for shard, group, _ in self.groups[i]]
        starts = np.cumsum([0] + [len(u.vectors) for u in units])
        order = (np.random.default_rng([self.seed, self.epoch, i]).permutation(starts[-1]) if self.shuffle
                 else np.arange(starts[-1]))
        return _Group(units, starts, order)

    def _unit(self, shard: int, group: int) -> _Unit:
        """One row group of a shard file: vectors as a view of Arrow's buffer in the stored dtype,
        text as object arrays (Python objects once per unit), labels, and its per-caption rows."""
        record = self.records[shard]
        left_out = self.left_out.get((shard, group))
        skip = _uncaptioned(record, group) > 0 or left_out is not None
        columns = self.columns + (["captions"] if skip and "captions" not in self.columns else [])
        table = _read(self.cache, self._file(shard, lambda r: open_part(self.cache, r)), record, columns, group)
        chunks = [torch.from_numpy(decode_embeddings(c, self.dim, self.cache.embedding_dtype))
                  for c in table.column("embedding").chunks]
        vectors = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        caption_values = caption_offsets = None
        if self.per_caption is not None:
            caption_values, caption_offsets = self.per_caption.rows(
                self._file(shard, self.per_caption.open_file, self.per_caption.folder), group)
        if skip:
            kept = pc.fill_null(pc.list_value_length(table.column("captions")), 0).to_numpy() > 0
            if left_out is not None:
                kept[left_out] = False
            keep = np.flatnonzero(kept)
            table, vectors = table.take(keep), vectors.index_select(0, torch.from_numpy(keep))
            if caption_values is not None:
                counts = caption_offsets[keep + 1] - caption_offsets[keep]
                caption_values = caption_values[_every_caption(caption_offsets, keep)]
                caption_offsets = np.concatenate([[0], np.cumsum(counts)])
        return _Unit(
            vectors=vectors,
            text={c: np.fromiter(table.column(c).to_pylist(), dtype=object, count=table.num_rows)
                  for c in ("key", "captions") if c in self.columns},
            labels=_labels(table) if "label" in self.columns else None,
            caption_values=caption_values, caption_offsets=caption_offsets)

    def _file(self, shard: int, open_file, kind: str = "shard") -> pq.ParquetFile:
        """A shard's (or its per-caption file's) open ParquetFile, the least recently used closed past MAX_OPEN_SHARDS."""
        key = (kind, shard)
        if key in self._files:
            self._files.move_to_end(key)
        else:
            self._files[key] = open_file(self.records[shard])
            if len(self._files) > MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close(force=True)
        return self._files[key]


def _uncaptioned(record: dict, group: int) -> int:
    """Rows of a part's row group that have no caption (`EmbeddingCache` records them per row group)."""
    return record["uncaptioned"][group] if "uncaptioned" in record else 0


def _every_caption(offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The indices of every caption of `rows`, row by row, from the rows' caption offsets."""
    starts, counts = offsets[rows], offsets[rows + 1] - offsets[rows]
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())


@dataclass
class _Unit:
    """One row group of one shard file in memory."""

    vectors: torch.Tensor  # [rows, D] in the stored dtype
    text: dict[str, np.ndarray]  # object arrays: key, captions
    labels: torch.Tensor | None
    caption_values: np.ndarray | None  # [captions, width], a row's captions at caption_offsets[row:row + 2]
    caption_offsets: np.ndarray | None


@dataclass
class _Group:
    """The units shuffled together: row r of the group is row r - starts[u] of units[u]."""

    units: list[_Unit]
    starts: np.ndarray
    order: np.ndarray
