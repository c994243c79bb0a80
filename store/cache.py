"""The embedding cache: a directory of Parquet shards that become visible only through commit records.

Object stores have no atomic rename, so a shard is published by a single small PUT: the data file
is uploaded under a writer-unique name, then `commits/{shard}.json` is created exclusively. Readers
see shards only through those records, so a crash anywhere leaves exactly the committed shards, and
two writers racing on one input commit it once (the loser's data file is an orphan that `verify`
reports and `remove_orphans` deletes). `finalize` folds the records into the manifest, so a complete
cache opens with one GET. The format is described in docs/cache-format.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import uuid
import warnings
from collections import Counter
from datetime import datetime, timezone

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import litpipe
from litpipe.errors import UserError
from litpipe.files import TEMP_MARK, is_local, ls_or_empty, naming, to_url, write_atomic, write_temp
from litpipe.store.duplicates import drop_later_duplicates
from litpipe.store.fingerprint import cache_id, canonical_json, dataset_fingerprint

# 3: the id covers the stored dtype and names local files by their bytes (store/fingerprint.py). A version 2
# cache is read as it is, and `litpipe cache migrate` (store/migrate.py) adopts it under its version 3 id.
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ERRORS_FILE = "errors.jsonl"
REQUIRED_COLUMNS = ("key", "captions", "embedding")
ADOPT_BATCH = 5000  # adopted parts per batch record
CHECK_PAGE_CHECKSUMS = True  # readers check each page's CRC; bench/store_read.py turns it off to measure the cost
FINALIZED_KEYS = ("completed", "num_rows", "bytes", "num_errors", "error_counts", "shards")  # what finalize adds
MANIFEST_KEYS = ("format_version", "id", "complete", "embedding_dtype", "row_group_rows", "encoder", "dataset")


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
    """The commit name of one part of an input shard; part 0 keeps the shard's own name, so
    caches written before parts existed read the same."""
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
    """One cache directory: its manifest, its committed shards, and reading and writing them."""

    def __init__(self, url: str, manifest: dict):
        self.url = url
        self.manifest = manifest
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self._read_records: dict[str, list[dict]] = {}  # commit record file -> its records, as read

    # --- finding and opening -------------------------------------------------------------

    @classmethod
    def open_or_create(cls, root: str, encoder_fp: dict, dataset_fp: dict, embedding_dtype: str = "float16",
                       row_group_rows: int = 65536, rows_per_commit: int | None = None,
                       dataset_name: str | None = None) -> EmbeddingCache:
        """The cache of this encoder and dataset under `root`, created empty if there is none.

        `embedding_dtype`, `row_group_rows` and `rows_per_commit` (samples per committed part of an
        input shard; none = a whole input shard) are fixed when a cache is created; an existing
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
            "dim": encoder_fp.get("dim"),
            "encoder": encoder_fp,
            "dataset": dataset_fp,
            "dataset_name": dataset_name,
        }
        cache = cls(url, manifest)
        cache.fs.makedirs(cache.path, exist_ok=True)
        # Two writers creating at once: the first manifest wins and both go on with it.
        cache._write_exclusive(_join(cache.path, MANIFEST), _dumps(manifest))
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
            manifest = json.loads(raw)
            problem = None if isinstance(manifest, dict) else "not a JSON object"
        except ValueError as err:
            problem = f"not valid JSON: {err}"
        if problem is None and (missing := [k for k in MANIFEST_KEYS if k not in manifest]):
            problem = f"missing {', '.join(missing)}"
        if problem:
            raise CacheError(f"{manifest_url}: corrupt cache manifest ({problem}); "
                             f"delete the cache (`litpipe cache rm`) and re-run `litpipe precompute`")
        version = manifest["format_version"]
        if version > FORMAT_VERSION:
            raise CacheError(f"{manifest_url}: cache format version {version} is newer than this litpipe "
                             f"{litpipe.__version__} reads (up to {FORMAT_VERSION}); upgrade litpipe")
        return cls(url, manifest)

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
        shards = self.shards()
        return shards[0]["dim"] if shards else None

    @property
    def num_rows(self) -> int:
        return sum(s["rows"] for s in self.shards())

    @property
    def rows_per_commit(self) -> int | None:
        """Samples per committed part of an input shard; None: one part per input shard."""
        return self.manifest.get("rows_per_commit")

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

    def shards(self) -> list[dict]:
        """Committed part records, in input order: the manifest's when complete, else commits/."""
        if self.complete:
            return self.manifest["shards"]
        return sorted(self._commit_records(), key=lambda r: (r["input"], r.get("part", 0)))

    def committed_parts(self, records: list[dict] | None = None) -> dict[str, set[int]]:
        """{input shard URL: its committed part numbers} (of `records`, default `shards()`): what a
        resumed writer skips."""
        parts: dict[str, set[int]] = {}
        for record in self.shards() if records is None else records:
            parts.setdefault(record["input"], set()).add(record.get("part", 0))
        return parts

    def committed_inputs(self) -> set[str]:
        """Input shard URLs whose every part is committed: the last part and all before it."""
        done = set()
        records = self.shards()
        parts = self.committed_parts(records)
        for record in records:
            last = record.get("part", 0)
            if record.get("last", True) and parts[record["input"]] >= set(range(last + 1)):
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
        return [e for s in self.shards() for e in s["errors"]]

    def _commit_records(self) -> list[dict]:
        """The records under commits/: one listing, and a GET only for the record files this object
        has not read yet. Record files are written once (`rewrite_part`, which replaces one, updates
        what was read), so a run that looks at commits/ several times reads each record once: at
        100,000 parts, a plan/finish cycle is a listing page per 1,000 parts a look, not a GET per part."""
        commits = _join(self.path, "commits")
        self.fs.invalidate_cache(commits)
        paths = [p for p in ls_or_empty(self.fs, commits) if p.endswith(".json")]
        unread = [p for p in paths if p not in self._read_records]
        for path, blob in (self.fs.cat(unread, on_error="return") if unread else {}).items():
            if isinstance(blob, FileNotFoundError):
                continue
            if isinstance(blob, Exception):
                raise blob
            try:
                loaded = json.loads(blob)
            except ValueError:
                raise CacheError(f"{to_url(self.fs, path)}: corrupt commit record; delete it and re-run "
                                 f"`litpipe precompute` to recompute that shard") from None
            self._read_records[path] = loaded["adopted"] if _is_batch(path) else [loaded]
        self._read_records = {p: self._read_records[p] for p in paths if p in self._read_records}  # removed ones go
        by_name: dict[str, dict] = {}
        for path in sorted(self._read_records, key=lambda p: (_is_batch(p), p)):  # part records first
            for record in self._read_records[path]:
                by_name.setdefault(record["name"], record)  # a part committed twice counts once
        return list(by_name.values())

    # --- writing -------------------------------------------------------------------------

    def commit_shard(self, input_url: str, table: pa.Table, errors=(), part: int = 0, last: bool = True) -> dict | None:
        """Publish the output of one input shard, or of its `part`-th run of `rows_per_commit`
        samples (`last`: no samples follow); None if that part is already committed.

        `table` has key (string), captions (list<string>), embedding (fixed_size_list, any float
        type: cast to the cache's embedding_dtype), optional label (int64) and metadata columns.
        """
        name = part_name(input_url, part)
        commit_path = _join(self.path, "commits", f"{name}.json")
        self.fs.invalidate_cache(_join(self.path, "commits"))
        if self.fs.exists(commit_path):
            return None
        if self.complete:
            raise CacheError(f"{self.url}: cache is complete (finalized) and takes no more shards; "
                             f"a changed dataset gets a new cache from `litpipe precompute`")
        table, dim = self._conform(table, input_url)
        record = {
            "name": name,
            "input": input_url,
            "part": part,
            "last": last,
            **self._write_data(name, table),
            "dim": dim,
            "committed": _now(),
            "errors": [{"key": str(e["key"]), "input": e.get("input", input_url), "reason": str(e["reason"])}
                       for e in errors],
        }
        self.fs.makedirs(_join(self.path, "commits"), exist_ok=True)
        if not self._write_exclusive(commit_path, _dumps(record)):
            self.fs.rm_file(_join(self.path, record["path"]))  # lost the race: the winner's shard stands
            return None
        return record

    def _write_data(self, name: str, table: pa.Table) -> dict:
        """Write a part's data file under a writer-unique name; the record's fields that describe it."""
        data_path = f"shards/{name}.{uuid.uuid4().hex[:12]}.parquet"
        blob = _parquet_bytes(table, self.manifest["row_group_rows"])
        self.fs.makedirs(_join(self.path, "shards"), exist_ok=True)
        try:
            self.fs.pipe_file(_join(self.path, data_path), blob)
        except OSError as err:  # a full disk leaves part of the file, which no record will ever name
            with contextlib.suppress(OSError):
                self.fs.rm_file(_join(self.path, data_path))
            raise naming(err, _join(self.url, data_path)) from err
        row_groups = _row_group_rows(blob)
        record = {"path": data_path, "rows": table.num_rows, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                  "columns": table.column_names, "row_groups": row_groups}
        uncaptioned = _uncaptioned(table, row_groups)
        return {**record, "uncaptioned": uncaptioned} if any(uncaptioned) else record

    def rewrite_part(self, record: dict, rows: list[int], reasons: list[str]) -> dict:
        """A committed part's record, its data file written again (in this cache's folder) without
        `rows`, each recorded as skipped with its reason; the old file is the caller's to delete."""
        table = self.read_part(self.open_shard(record), record, record["columns"])
        keys = table.column("key").to_pylist()
        keep = np.ones(table.num_rows, bool)
        keep[rows] = False
        skipped = [{"key": keys[row], "input": record["input"], "reason": reason} for row, reason in zip(rows, reasons)]
        rewritten = {k: v for k, v in record.items() if k != "owner"}
        rewritten.update(self._write_data(record["name"], table.filter(keep)), duplicates_dropped=len(rows),
                         errors=record.get("errors", []) + skipped)
        # The part's own record names the new file from now on (taking over an adopted one), so the
        # cache reads the same if it becomes partial again (`uncommit`).
        self.fs.makedirs(_join(self.path, "commits"), exist_ok=True)
        commit_path = _join(self.path, "commits", f"{record['name']}.json")
        write_atomic(self.fs, commit_path, _dumps(rewritten))
        self._read_records[commit_path] = [rewritten]
        return rewritten

    def adopt(self, parts: list[tuple[dict, EmbeddingCache, list[dict]]]) -> None:
        """Commit parts other caches of the same encoder already embedded from the same input bytes,
        each `(record, donor, its skipped samples)`: records naming the donors' data files (no copy),
        written as a few batch records (`commits/adopted-*.json`, ADOPT_BATCH parts each): one PUT per
        batch, not per part, so a view over 10,000 shards is committed and opened in a few requests.
        A part also committed otherwise keeps that record (`_commit_records`)."""
        if self.complete:
            raise CacheError(f"{self.url}: cache is complete (finalized) and takes no more shards")
        records = []
        for record, donor, errors in parts:
            adopted = {**{k: v for k, v in record.items() if k != "num_errors"}, "errors": errors,
                       "owner": donor.owner(record)}
            if adopted["owner"] == self.id:  # a file of this folder that another cache had borrowed
                del adopted["owner"]
            records.append(adopted)
        if records:
            self.fs.makedirs(_join(self.path, "commits"), exist_ok=True)
        for start in range(0, len(records), ADOPT_BATCH):
            batch = records[start:start + ADOPT_BATCH]
            self._write_exclusive(_join(self.path, "commits", _batch_name(batch)),
                                  _dumps({"adopted": batch, "committed": _now()}))  # the same batch twice: one stands

    def uncommit(self, name: str) -> dict:
        """Take the committed part `name` back out, so the next `litpipe precompute` embeds it again
        (a complete cache becomes partial first); its record. The data file is the caller's to
        delete (`sharing.remove_part`): another cache may name it."""
        record = next((r for r in self.shards() if r["name"] == name), None)
        if record is None:
            raise CacheError(f"{self.url}: no committed part named {name!r}; `litpipe cache show {self.id}` lists them")
        if self.complete:
            manifest = {k: v for k, v in self.manifest.items() if k not in FINALIZED_KEYS}
            write_atomic(self.fs, _join(self.path, MANIFEST), _dumps({**manifest, "complete": False}))
            self.manifest = {**manifest, "complete": False}
        commits = _join(self.path, "commits")
        for path in ls_or_empty(self.fs, commits):
            if path.endswith(f"/{name}.json"):
                self.fs.rm_file(path)
            elif _is_batch(path):
                batch = json.loads(self.fs.cat_file(path))
                kept = [r for r in batch["adopted"] if r["name"] != name]
                if len(kept) < len(batch["adopted"]):  # the batch again, less this part, then the old one goes
                    if kept:
                        self._write_exclusive(_join(commits, _batch_name(kept)), _dumps({**batch, "adopted": kept}))
                    self.fs.rm_file(path)
        return record

    def _conform(self, table: pa.Table, input_url: str) -> tuple[pa.Table, int]:
        """Check the columns and cast them to the cache's schema, so every shard reads alike."""
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise CacheError(f"shard of {input_url}: missing column(s) {', '.join(missing)}; a shard needs "
                             f"key, captions and embedding")
        emb_type = table.schema.field("embedding").type
        if not pa.types.is_fixed_size_list(emb_type):
            raise CacheError(f"shard of {input_url}: `embedding` is {emb_type}; it must be fixed_size_list<float, D> "
                             f"(pa.FixedSizeListArray.from_arrays(values, D))")
        dim = self.dim
        if dim is not None and emb_type.list_size != dim:
            raise CacheError(f"shard of {input_url}: embedding dim {emb_type.list_size} differs from the cache's {dim} "
                             f"({self.manifest_url}); the encoder fingerprint's dim is wrong or the shard is from another encoder")
        if pc.count_distinct(table.column("key")).as_py() != table.num_rows:
            raise CacheError(f"shard of {input_url}: duplicate keys; keys must be unique in the cache")
        vectors = table.column("embedding").combine_chunks()
        if vectors.null_count or vectors.flatten().null_count:
            raise CacheError(f"shard of {input_url}: null embeddings; report failed samples as errors instead")
        target = {"key": pa.string(), "captions": pa.list_(pa.string()), "label": pa.int64()}
        fields = [pa.field(f.name, target.get(f.name, f.type)) for f in table.schema if f.name != "embedding"]
        try:
            table = table.drop_columns(["embedding"]).cast(pa.schema(fields))
            stored = encode_embeddings(vectors, self.embedding_dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise CacheError(f"shard of {input_url}: columns do not fit the cache schema ({err})") from None
        field = pa.field("embedding", stored.type, nullable=False,
                         metadata={"litpipe.dtype": self.embedding_dtype, "litpipe.dim": str(emb_type.list_size)})
        return table.add_column(table.schema.get_field_index("captions") + 1, field, stored), emb_type.list_size

    def finalize(self, expected_inputs=None) -> dict:
        """Fold the commit records into the manifest (complete=True) and write errors.jsonl; a key
        repeated across parts stays in the first only (`duplicates.py`).

        With `expected_inputs`, refuse while any of them is not committed yet.
        """
        if self.complete:
            return self.manifest
        records = self.shards()
        if expected_inputs is not None:
            missing = sorted(set(expected_inputs) - self.committed_inputs())
            if missing:
                raise CacheError(f"{self.url}: cannot finalize, {len(missing)} input shard(s) not committed "
                                 f"(first: {missing[0]}); re-run `litpipe precompute` to finish them")
        records, replaced = drop_later_duplicates(self, records)
        errors = [e for r in records for e in r["errors"]]
        # Keys sorted: a record read back from its file and one made in this process write the same line.
        errors_blob = "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode()
        write_atomic(self.fs, _join(self.path, ERRORS_FILE), errors_blob)
        manifest = dict(self.manifest)
        manifest.update(
            complete=True,
            completed=_now(),
            dim=self.dim,
            num_rows=sum(r["rows"] for r in records),
            bytes=sum(r["bytes"] for r in records),
            num_errors=len(errors),
            error_counts=dict(Counter(e["reason"] for e in errors)),
            shards=[{**{k: v for k, v in r.items() if k != "errors"}, "num_errors": len(r["errors"])} for r in records],
        )
        write_atomic(self.fs, _join(self.path, MANIFEST), _dumps(manifest))
        self.manifest = manifest
        named = referenced_files(list_caches(to_url(self.fs, self.root))) if replaced else {}
        for record in replaced:  # the files of parts rewritten without their duplicates, unless a cache names them
            if (self.owner(record), record["path"]) not in named:
                with contextlib.suppress(FileNotFoundError):  # a finalize running beside this one took it
                    self.fs.rm_file(self.file_path(record))
        return manifest

    def _write_exclusive(self, path: str, data: bytes) -> bool:
        """Create a file only if absent, atomically; False when it already exists."""
        if is_local(self.fs):
            tmp = write_temp(path, data)
            try:
                os.link(tmp, path)  # fails if `path` exists, never half-written
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            self.fs.pipe_file(path, data, mode="create")  # S3 If-None-Match: *
        except OSError as err:  # FileExistsError, or a 412 under another name
            if not isinstance(err, FileExistsError) and "PreconditionFailed" not in str(err) and "412" not in str(err):
                raise
        # Read back in every case: a PUT whose reply was lost is resent by the client and answered 412
        # although it was ours; and on stores that ignore the precondition the last PUT wins. Whoever
        # reads back its own bytes (each record names a writer-unique data file) won.
        self.fs.invalidate_cache(path)
        return self.fs.cat_file(path) == data

    # --- reading -------------------------------------------------------------------------

    def open_shard(self, record: dict, whole: bool = False) -> pq.ParquetFile:
        """A shard's Parquet file; `whole` fetches it in one read (remote stores), not by ranges.

        Checks what a reader relies on: a readable footer, the recorded rows and the cache's dim.
        Pages are checked against their CRCs as they are read (`read_part`).
        """
        path, url = self.file_path(record), self.file_url(record)
        try:
            if is_local(self.fs):
                source = path
            elif whole:
                source = pa.BufferReader(self.fs.cat_file(path))
            else:
                source = self.fs.open(path, "rb")
            parquet = pq.ParquetFile(source, memory_map=is_local(self.fs),  # local: decode straight from the page cache
                                     page_checksum_verification=CHECK_PAGE_CHECKSUMS)
        except FileNotFoundError:
            raise CacheError(f"{url}: committed shard is missing; {self.fix(record)}") from None
        except (pa.ArrowInvalid, OSError) as err:
            raise CacheError(f"{url}: unreadable Parquet shard, truncated or corrupt ({err}); {self.fix(record)}") from None
        dim = stored_dim(parquet.schema_arrow.field("embedding"), self.embedding_dtype)
        if dim != self.dim:
            raise CacheError(f"{url}: embedding dim {dim} differs from the cache's {self.dim}; the shard belongs to "
                             f"another encoder: {self.fix(record)}")
        if parquet.metadata.num_rows != record["rows"]:
            raise CacheError(f"{url}: {parquet.metadata.num_rows} rows, its commit record says {record['rows']}; "
                             f"the file was replaced: {self.fix(record)}")
        return parquet

    def read_part(self, parquet: pq.ParquetFile, record: dict, columns: list[str], group: int | None = None) -> pa.Table:
        """`columns` of an open shard (one row group of it, or all); a page whose bytes changed since
        they were written (its CRC fails) or that cannot be decoded is an error naming the file and the fix."""
        try:
            return parquet.read(columns=columns) if group is None else parquet.read_row_group(group, columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            raise CacheError(f"{self.file_url(record)}: corrupt data in a committed shard ({err}); {self.fix(record)}") from None

    def fix(self, record: dict) -> str:
        """What to run when a committed shard's file is damaged or gone."""
        return (f"run `litpipe cache verify {self.id}` to list every damaged file, then `litpipe cache rm {self.id} "
                f"--shard {record['name']}` and `litpipe precompute` to embed that part again")

    # --- checking and removing -----------------------------------------------------------

    def verify(self) -> list[str]:
        """Re-read every shard; each problem names its file. Empty = good. A key in several parts is
        one only in a complete cache: a partial one keeps every copy until `finalize` drops the later."""
        problems = []
        records = self.shards()
        seen_keys: dict[str, str] = {}
        for record in records:
            url = self.file_url(record)
            try:
                blob = self.fs.cat_file(self.file_path(record))
            except FileNotFoundError:
                problems.append(f"{url}: committed shard is missing")
                continue
            if len(blob) != record["bytes"]:
                problems.append(f"{url}: {len(blob)} bytes, its commit record says {record['bytes']} (truncated or replaced)")
            if hashlib.sha256(blob).hexdigest() != record["sha256"]:
                problems.append(f"{url}: sha256 differs from its commit record (corrupted or replaced)")
            try:
                table = pq.read_table(pa.BufferReader(blob), page_checksum_verification=True)
            except (pa.ArrowInvalid, OSError) as err:
                problems.append(f"{url}: unreadable Parquet ({err})")
                continue
            if table.num_rows != record["rows"]:
                problems.append(f"{url}: {table.num_rows} rows, its commit record says {record['rows']}")
            dim = stored_dim(table.schema.field("embedding"), self.embedding_dtype)
            if dim != self.dim:
                problems.append(f"{url}: embedding dim {dim}, the cache's is {self.dim}")
                continue
            vectors = decode_embeddings(table.column("embedding"), dim, self.embedding_dtype)
            bad = int(table.num_rows - np.isfinite(vectors).all(axis=1).sum())
            if bad:
                problems.append(f"{url}: {bad} embedding(s) with NaN or inf")
            for key in table.column("key").to_pylist() if self.complete else []:  # a partial cache's wait for finalize
                if key in seen_keys:
                    problems.append(f"{url}: key {key!r} also in {seen_keys[key]} (duplicate key)")
                else:
                    seen_keys[key] = record["path"]
        for path in self.orphans():
            what = ("temporary file of a writer killed before its rename" if TEMP_MARK in path else
                    "orphaned data file, in no commit record (a crashed or losing writer)")
            problems.append(f"{_join(self.url, path)}: {what}; `litpipe cache rm {self.id} --orphans` deletes it")
        return problems

    def orphans(self) -> list[str]:
        """Files no reader will look at (paths relative to the cache folder): data files under shards/
        that no commit record names, neither this cache's nor one of another cache that adopted them;
        and temporary files (`*.tmp-*`) a writer killed between writing and renaming left.

        While a writer runs, its in-flight files show here too until it commits.
        """
        self.fs.invalidate_cache(self.path)
        listed = {folder: [os.path.basename(p) for p in ls_or_empty(self.fs, _join(self.path, folder) if folder else self.path)]
                  for folder in ("", "shards", "commits")}
        committed = {s["path"] for s in self.shards() if self.owner(s) == self.id}
        committed |= {path for owner, path in referenced_files(list_caches(to_url(self.fs, self.root))) if owner == self.id}
        data = [p for p in (f"shards/{name}" for name in listed["shards"]) if p not in committed]
        temps = [f"{folder}/{name}".lstrip("/") for folder, names in listed.items() for name in names if TEMP_MARK in name]
        return sorted(set(data + temps))

    def remove_orphans(self) -> list[str]:
        """Delete orphans that can no longer be committed: all of them in a complete cache, else
        those of a part already committed (a race loser or a crashed earlier attempt)."""
        committed_names = {s["name"] for s in self.shards()}
        removed = [p for p in self.orphans() if self.complete or
                   (p.startswith(("shards/", "commits/")) and os.path.basename(p).split(".")[0] in committed_names)]
        for path in removed:
            self.fs.rm_file(_join(self.path, path))
        return removed


def _batch_name(records: list[dict]) -> str:
    """An adoption batch record's file name: a digest of what it names, so the same batch twice is one file."""
    digest = hashlib.sha256(canonical_json([(r["name"], r.get("owner"), r["path"]) for r in records]).encode())
    return f"adopted-{digest.hexdigest()[:16]}.json"


def _is_batch(path: str) -> bool:
    """An adoption batch record (`commits/adopted-*.json`), as against one part's record."""
    return path.rsplit("/", 1)[-1].startswith("adopted-")


def referenced_files(caches: list[EmbeddingCache]) -> dict[tuple[str, str], set[str]]:
    """(owner cache id, data file path in its folder) -> the ids of the caches whose records name it."""
    refs: dict[tuple[str, str], set[str]] = {}
    for cache in caches:
        for record in cache.shards():
            refs.setdefault((cache.owner(record), record["path"]), set()).add(cache.id)
    return refs


def _dumps(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def _leaf_paths(field: pa.Field, prefix: str = "") -> list[str]:
    """Parquet column paths of an Arrow field (lists nest as name.list.element)."""
    name = prefix + field.name
    t = field.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _leaf_paths(pa.field("element", t.value_type), name + ".list.")
    if pa.types.is_struct(t):
        return [p for i in range(t.num_fields) for p in _leaf_paths(t.field(i), name + ".")]
    if pa.types.is_map(t):
        return [f"{name}.key_value.key", *_leaf_paths(pa.field("value", t.item_type), name + ".key_value.")]
    return [name]


def _parquet_bytes(table: pa.Table, row_group_rows: int) -> bytes:
    """The shard file: vectors plain and uncompressed (they do not compress; decoding speed
    matters), every other column zstd; every page with its CRC, so a flipped bit fails the read."""
    paths = [p for f in table.schema for p in _leaf_paths(f)]
    compression = {p: ("none" if p == "embedding" else "zstd") for p in paths}
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_rows, compression=compression, write_page_checksum=True,
                   use_dictionary=[f.name for f in table.schema if f.name != "embedding"],
                   write_statistics=[p for p in paths if p != "embedding" and not p.startswith("captions.")])
    return sink.getvalue()


def _uncaptioned(table: pa.Table, row_groups: list[int]) -> list[int]:
    """Rows without a caption in each row group (an image of a classification set): what training skips."""
    empty = pc.equal(pc.fill_null(pc.list_value_length(table.column("captions")), 0), 0).to_numpy(zero_copy_only=False)
    return [int(n) for n in np.add.reduceat(empty, np.r_[0, np.cumsum(row_groups)[:-1]])] if len(empty) else []


def _row_group_rows(blob: bytes) -> list[int]:
    meta = pq.ParquetFile(pa.BufferReader(blob)).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


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
