"""The embedding cache: finding and opening one, and what it holds.

A cache is a folder of Parquet parts that become visible only through commit records; this module
names caches (by their identity, `fingerprint.py`), opens them, and lists their committed parts and
skipped samples. How a part is committed, adopted, taken out or finalized is `commits.py`; reading a
part's file is `parts.py`; verifying and cleaning up is `maintenance.py`. The format is described in
docs/cache-format.md.

One word for each thing: an *input shard* is what a dataset lists (a tar, a Parquet file); a *part*
is what is committed, a run of up to `rows_per_commit` samples of one input shard, one data file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from datetime import datetime, timezone

import fsspec
import numpy as np
import pyarrow as pa

import litpipe
from litpipe.errors import UserError
from litpipe.files import file_paths, read_small, to_url, write_exclusive
from litpipe.store.fingerprint import cache_id, canonical_json, dataset_fingerprint
from litpipe.store.records import PartRecords, Spool, record_line, split_manifest

# 3: the id covers the stored dtype and names local files by their bytes (store/fingerprint.py). A version 2
# cache is read as it is, and `litpipe cache migrate` (store/migrate.py) adopts it under its version 3 id.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ERRORS_FILE = "errors.jsonl"
MANIFEST_KEYS = ("format_version", "id", "complete", "embedding_dtype", "row_group_rows", "encoder", "dataset")
READ_PAGE = 100  # commit record files fetched at once: at 1,000, s3fs's buffers left 9 MB in the driver at 10,000 parts


class CacheError(UserError):
    """A cache that is missing, corrupt, or was asked to hold something it cannot."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _normalise_root(root: str) -> str:
    fs, path = fsspec.core.url_to_fs(root)
    return to_url(fs, path)


def shard_name(input_url: str) -> str:
    """A deterministic output name for an input shard: its readable stem plus a hash of the full URL."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.basename(input_url.rstrip("/")).split(".")[0])[:40] or "shard"
    return f"{stem}-{hashlib.sha256(input_url.encode()).hexdigest()[:10]}"


def part_name(input_url: str, part: int) -> str:
    """The commit name of one part of an input shard: the shard's own name for part 0, `-p{k}` after it."""
    return shard_name(input_url) if part == 0 else f"{shard_name(input_url)}-p{part:05d}"


def encode_embeddings(vectors: pa.Array, dtype: str) -> pa.Array:
    """fixed_size_list<float, D> -> the stored form: one fixed_size_binary(D * itemsize) per row.

    Parquet decodes a list column value by value (float16 even as 2-byte binaries) at a fraction
    of disk speed; one fixed-width binary per row decodes at memcpy speed (see docs/cache-format.md).
    """
    dim = vectors.type.list_size
    values = vectors.flatten().cast(getattr(pa, dtype)()).to_numpy(zero_copy_only=False)
    values = np.ascontiguousarray(values)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(dim * values.itemsize), len(vectors), [None, pa.py_buffer(values)])


def decode_embeddings(column: pa.ChunkedArray | pa.Array, dim: int, dtype: str) -> np.ndarray:
    """The stored embedding column as an [n, D] numpy array: a view of Arrow's buffer for one chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views = [np.frombuffer(c.buffers()[1], dtype=dtype, count=len(c) * dim, offset=c.offset * c.type.byte_width)
             for c in chunks]
    return (views[0] if len(views) == 1 else np.concatenate(views) if views else np.empty(0, dtype)).reshape(-1, dim)


def stored_dim(field: pa.Field, dtype: str) -> int:
    return field.type.byte_width // np.dtype(dtype).itemsize


class EmbeddingCache:
    """One cache folder: its manifest and its committed parts.

    `manifest` is the manifest file less a complete cache's `shards`, which `parts()` holds as compact
    lines (`records`, or made from `manifest["shards"]`); a complete cache made without them
    (`tasks.bare`) reads no parts."""

    def __init__(self, url: str, manifest: dict, records: PartRecords | None = None):
        self.url = url
        self.manifest = {k: v for k, v in manifest.items() if k != "shards"}
        if records is None and "shards" in manifest:
            records = PartRecords.of(manifest["shards"])
        self._finalized = records
        self.fs, self.path = fsspec.core.url_to_fs(url)
        # commit record file -> ((input, part), name, where its line is in the spool) of each record in it, as read
        self._read_records: dict[str, list[tuple[tuple[str, int], str, int, int]]] = {}
        self._spool = Spool()

    def __reduce__(self):
        """Pickled (sent to a Ray task) as its URL, manifest and a complete cache's records; what this
        process has read of commits/ stays here."""
        return EmbeddingCache, (self.url, self.manifest, self._finalized)

    # --- finding and opening -------------------------------------------------------------

    @classmethod
    def open_or_create(cls, root: str, encoder_fp: dict, dataset_fp: dict, embedding_dtype: str = "float16",
                       row_group_rows: int = 65536, rows_per_commit: int | None = None,
                       dataset_name: str | None = None, part_bytes: int | None = None) -> EmbeddingCache:
        """The cache of this encoder and dataset under `root`, created empty if there is none.

        `embedding_dtype`, `row_group_rows`, `rows_per_commit` (samples per committed part of an
        input shard; none = a whole input shard) and `part_bytes` (a part's bound in image bytes,
        `precompute.read.cut_parts`; none = rows alone) are fixed when a cache is created; an existing
        cache keeps its own (the manifest records them), so a resumed run cuts the same parts.
        `dataset_name`, the `data` entry that creates it, is recorded for `litpipe cache ls`; never matched.
        """
        if embedding_dtype not in ("float16", "float32"):
            raise CacheError(f"embedding_dtype {embedding_dtype!r}: use float16 or float32 (store.embedding_dtype)")
        found = cls.find(root, encoder_fp, dataset_fp, embedding_dtype)
        if found is not None:
            return found
        cid = cache_id(encoder_fp, dataset_fp, embedding_dtype)
        url = _join(_normalise_root(root), cid)
        manifest = {
            "format_version": FORMAT_VERSION,
            "id": cid,
            "litpipe_version": litpipe.__version__,
            "created": _now(),
            "complete": False,
            "embedding_dtype": embedding_dtype,
            "row_group_rows": row_group_rows,
            "rows_per_commit": rows_per_commit,
            "part_bytes": part_bytes,
            "dim": encoder_fp.get("dim"),
            "encoder": encoder_fp,
            "dataset": dataset_fp,
            "dataset_name": dataset_name,
        }
        cache = cls(url, manifest)
        cache.fs.makedirs(cache.path, exist_ok=True)
        # Two writers creating at once: the first manifest wins and both go on with it.
        write_exclusive(cache.fs, _join(cache.path, MANIFEST), _dumps(manifest))
        return cls.open(url)

    @classmethod
    def find(cls, root: str, encoder_fp: dict, dataset_fp: dict, embedding_dtype: str = "float16") -> EmbeddingCache | None:
        """The cache (complete or partial) made from exactly these fingerprints and dtype, or None."""
        url = _join(_normalise_root(root), cache_id(encoder_fp, dataset_fp, embedding_dtype))
        fs, path = fsspec.core.url_to_fs(url)
        fs.invalidate_cache(path)
        if not fs.exists(_join(path, MANIFEST)):
            return None
        cache = cls.open(url)
        if canonical_json(cache.manifest["encoder"]) != canonical_json(encoder_fp) or \
                canonical_json(cache.manifest["dataset"]) != canonical_json(dataset_fp) or \
                cache.embedding_dtype != embedding_dtype:
            raise CacheError(f"{cache.manifest_url}: its fingerprints differ from its id; the cache was edited. "
                             f"Remove it with `litpipe cache rm {cache.id}` and re-run `litpipe precompute`")
        return cache

    @classmethod
    def open(cls, url_or_id: str, root: str | None = None) -> EmbeddingCache:
        """A cache by URL, or by id (or unique id prefix) under `root`."""
        url = url_or_id
        if root is not None and "/" not in url_or_id and "://" not in url_or_id:
            url = _join(_normalise_root(root), url_or_id)
            fs, path = fsspec.core.url_to_fs(url)
            if not fs.exists(_join(path, MANIFEST)):
                matches = [c for c in list_caches(root) if c.id.startswith(url_or_id)]
                if len(matches) == 1:
                    return matches[0]
                raise CacheError(f"{url_or_id}: no cache with this id under {root} "
                                 f"({'several match' if matches else 'none matches'}); `litpipe cache ls` lists them")
        fs, path = fsspec.core.url_to_fs(url)
        url = to_url(fs, path)
        manifest_url = _join(url, MANIFEST)
        try:
            raw = fs.cat_file(_join(path, MANIFEST))
        except FileNotFoundError:
            raise CacheError(f"{manifest_url}: no cache manifest here; check the cache URL or id "
                             f"(`litpipe cache ls` lists caches), or run `litpipe precompute` to build it") from None
        try:
            head, records = split_manifest(raw)
            manifest = json.loads(head)
            problem = None if isinstance(manifest, dict) else "not a JSON object"
        except ValueError as err:
            problem = f"not valid JSON: {err}"
        if problem is None and (missing := [k for k in MANIFEST_KEYS if k not in manifest]):
            problem = f"missing {', '.join(missing)}"
        if problem is None and manifest["complete"] and records is None and not isinstance(manifest.get("shards"), list):
            problem = "complete, but no list of its parts (`shards`)"
        if problem:
            raise CacheError(f"{manifest_url}: corrupt cache manifest ({problem}); "
                             f"delete the cache (`litpipe cache rm`) and re-run `litpipe precompute`")
        version = manifest["format_version"]
        if version > FORMAT_VERSION:
            raise CacheError(f"{manifest_url}: cache format version {version} is newer than this litpipe "
                             f"{litpipe.__version__} reads (up to {FORMAT_VERSION}); upgrade litpipe")
        return cls(url, manifest, records)

    # --- what it holds -------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def manifest_url(self) -> str:
        return _join(self.url, MANIFEST)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def embedding_dtype(self) -> str:
        return self.manifest["embedding_dtype"]

    @property
    def dim(self) -> int | None:
        if self.manifest.get("dim") is not None:
            return self.manifest["dim"]
        shards = self.parts()
        return shards[0]["dim"] if shards else None

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.parts())

    @property
    def uncaptioned(self) -> int:
        """Rows without a caption (images of a classification set): kept for zero-shot, left out of training."""
        return sum(sum(r.get("uncaptioned", [])) for r in self.parts())

    @property
    def rows_per_commit(self) -> int | None:
        """Samples per committed part of an input shard; None: one part per input shard."""
        return self.manifest.get("rows_per_commit")

    @property
    def part_bytes(self) -> int | None:
        """A part's bound in image bytes, encoded plus decoded; None: rows alone (caches made before it)."""
        return self.manifest.get("part_bytes")

    @property
    def root(self) -> str:
        """The store.root path this cache's folder is in (where the caches it borrows from live too)."""
        return self.path.rstrip("/").rsplit("/", 1)[0]

    def owner(self, record: dict) -> str:
        """The id of the cache whose folder holds a record's data file: its own, or the one it was adopted from."""
        return record.get("owner", self.id)

    def file_path(self, record: dict) -> str:
        """A record's data file as a path of `self.fs`, in whichever cache's folder it lives."""
        return _join(self.root, self.owner(record), record["path"])

    def file_url(self, record: dict) -> str:
        return to_url(self.fs, self.file_path(record))

    def parts(self) -> PartRecords:
        """Committed part records, in input order: the manifest's when complete, else commits/."""
        if not self.complete:
            return self._commit_records()
        if self._finalized is None:
            raise CacheError(f"{self.url}: this copy of the cache was made without its part records (a task's); "
                             "open the cache again (`EmbeddingCache.open`) to read them")
        return self._finalized

    def finalized(self, manifest: dict, records: PartRecords) -> None:
        """This object once the cache is complete (finalized here or by another process)."""
        self.manifest, self._finalized = {k: v for k, v in manifest.items() if k != "shards"}, records
        self._read_records = {}

    def committed_parts(self, records: PartRecords | None = None) -> dict[str, set[int]]:
        """{input shard URL: its committed part numbers} (of `records`, default `parts()`): what a
        resumed writer skips."""
        parts: dict[str, set[int]] = {}
        for record in self.parts() if records is None else records:
            parts.setdefault(record["input"], set()).add(record["part"])
        return parts

    def committed_inputs(self) -> set[str]:
        """Input shard URLs whose every part is committed: the last part and all before it."""
        done = set()
        records = self.parts()
        parts = self.committed_parts(records)
        for record in records:
            last = record["part"]
            if record["last"] and parts[record["input"]] >= set(range(last + 1)):
                done.add(record["input"])
        return done

    def errors(self) -> list[dict]:
        """Skipped samples, each {"key", "input", "reason"}."""
        if self.complete:
            try:
                text = self.fs.cat_file(_join(self.path, ERRORS_FILE)).decode()
            except FileNotFoundError:
                raise CacheError(f"{_join(self.url, ERRORS_FILE)}: missing from a complete cache; "
                                 f"delete the cache (`litpipe cache rm {self.id}`) and re-run `litpipe precompute`") from None
            return [json.loads(line) for line in text.splitlines() if line]
        return [e for s in self.parts() for e in s["errors"]]

    def _commit_records(self) -> PartRecords:
        """The records under commits/: one listing, and a GET only for the record files this object
        has not read yet. Record files are written once (finalize, which replaces some, updates what
        was read: `remember_record`), so a run that looks at commits/ several times reads each record once: at
        100,000 parts, a plan/finish cycle is a listing page per 1,000 parts a look, not a GET per part."""
        paths = [p for p in file_paths(self.fs, _join(self.path, "commits")) if p.endswith(".json")]
        unread = [p for p in paths if p not in self._read_records]
        pages = (read_small(self.fs, unread[i:i + READ_PAGE]) for i in range(0, len(unread), READ_PAGE))
        for path, blob in ((path, blob) for page in pages for path, blob in page.items()):
            if isinstance(blob, FileNotFoundError):
                continue
            if isinstance(blob, Exception):
                raise blob
            try:
                loaded = json.loads(blob)
            except ValueError:
                raise CacheError(f"{to_url(self.fs, path)}: corrupt commit record; delete it and re-run "
                                 f"`litpipe precompute` to recompute that shard") from None
            self._read_records[path] = [self._held(r) for r in (loaded["adopted"] if _is_batch(path) else [loaded])]
        self._read_records = {p: self._read_records[p] for p in paths if p in self._read_records}  # removed ones go
        by_name: dict[str, tuple] = {}
        for path in sorted(self._read_records, key=lambda p: (_is_batch(p), p)):  # part records first
            for held in self._read_records[path]:
                by_name.setdefault(held[1], held)  # a part committed twice counts once
        ordered = sorted(by_name.values(), key=lambda held: held[0])
        return PartRecords.placed(self._spool, [start for *_, start, _ in ordered], [size for *_, size in ordered])

    def remember_record(self, path: str, record: dict) -> None:
        """A record file this process has just had replaced (`commits.rewrite_part`, maybe in a Ray task):
        read again as written."""
        self._read_records[path] = [self._held(record)]

    def _held(self, record: dict) -> tuple[tuple[str, int], str, int, int]:
        """A record read from commits/ as this object keeps it: its place in input order, its name, where
        its line is in the spool."""
        line = record_line(record)
        return (record["input"], record["part"]), record["name"], self._spool.append(line), len(line)


def _is_batch(path: str) -> bool:
    """An adoption batch record (`commits/adopted-*.json`), as against one part's record."""
    return path.rsplit("/", 1)[-1].startswith("adopted-")


def referenced_files(caches: list[EmbeddingCache], among: set | None = None) -> dict[tuple[str, str], set[str]]:
    """(owner cache id, data file path in its folder) -> the ids of the caches whose records name it;
    with `among`, those files alone (finalize asks about the files it replaced, not every part of every cache)."""
    refs: dict[tuple[str, str], set[str]] = {}
    for cache in caches:
        for record in cache.parts():
            file = (cache.owner(record), record["path"])
            if among is None or file in among:
                refs.setdefault(file, set()).add(cache.id)
    return refs


def _dumps(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


# --- the store root ----------------------------------------------------------------------


def list_caches(root: str) -> list[EmbeddingCache]:
    """Every readable cache under `root`, oldest first; unreadable ones are skipped with a warning."""
    fs, path = fsspec.core.url_to_fs(_normalise_root(root))
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    caches = []
    for entry in entries:
        if entry["type"] != "directory":
            continue
        if not fs.exists(_join(entry["name"], MANIFEST)):
            continue
        try:
            caches.append(EmbeddingCache.open(to_url(fs, entry["name"])))
        except CacheError as err:
            warnings.warn(str(err), stacklevel=2)
    return sorted(caches, key=lambda c: (c.manifest["created"], c.id))


def resolve_cache(cfg, dataset_name: str, explicit: str | None = None) -> EmbeddingCache:
    """The cache train/eval should read for `dataset_name`: `explicit` (an id or URL) if given, else
    the one whose encoder spec equals `cfg.encoder`'s (less `device`, local files by their bytes), whose
    dataset fingerprint equals the dataset's current one and whose dtype is store.embedding_dtype;
    complete before partial, newest first."""
    if explicit:
        return EmbeddingCache.open(explicit, root=cfg.store.root)
    dataset_fp = json.loads(canonical_json(dataset_fingerprint(cfg.data[dataset_name])))
    spec = json.loads(canonical_json(cfg.encoder.spec()))
    caches = list_caches(cfg.store.root)
    matches = [c for c in caches
               if json.loads(canonical_json(c.manifest["encoder"].get("spec"))) == spec
               and json.loads(canonical_json(c.manifest["dataset"])) == dataset_fp
               and c.embedding_dtype == cfg.store.embedding_dtype]
    if not matches:
        older = [c.id for c in caches if c.manifest["format_version"] < FORMAT_VERSION]
        hint = (f"; {len(older)} cache(s) here were made by an earlier litpipe: `litpipe precompute` adopts one of "
                "the same vectors without encoding" if older else "")
        raise CacheError(f"no {cfg.store.embedding_dtype} cache of dataset `{dataset_name}` for encoder "
                         f"`{cfg.encoder.model}` under {cfg.store.root}; run `litpipe precompute` first (`litpipe cache ls` "
                         f"lists what is there){hint}")
    return max(matches, key=lambda c: (c.complete, c.manifest["created"]))
