"""The commit protocol: how a part becomes visible in a cache, and how it leaves again.

Object stores have no atomic rename, so a part is published by a single small PUT: the data file
is uploaded under a writer-unique name, then `commits/{part}.json` is created exclusively
(`files.write_exclusive`). Readers see parts only through those records, so a crash anywhere leaves
exactly the committed parts, and two writers racing on one input commit it once (the loser's data
file is an orphan that `maintenance.verify` reports). `finalize` folds the records into the
manifest, so a complete cache opens with one GET. docs/cache-format.md describes the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import uuid
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from litpipe.files import file_exists, ls_or_empty, make_folder, naming, to_url, write_atomic, write_exclusive
from litpipe.skips import duplicate_reason
from litpipe.store.cache import (ERRORS_FILE, MANIFEST, CacheError, EmbeddingCache, _dumps, _is_batch, _join, _now,
                                 encode_embeddings, list_caches, part_name, referenced_files)
from litpipe.store.duplicates import later_duplicates
from litpipe.store.fingerprint import canonical_json
from litpipe.store.parts import open_part, read_part
from litpipe.store.records import PartRecords, manifest_chunks, record_line
from litpipe.store.tasks import spread_as_done

REQUIRED_COLUMNS = ("key", "captions", "embedding")
ADOPT_BATCH = 5000  # adopted parts per batch record
FINALIZED_KEYS = ("completed", "num_rows", "bytes", "num_errors", "error_counts", "shards")  # what finalize adds


def commit_part(cache: EmbeddingCache, input_url: str, table: pa.Table, errors=(), part: int = 0,
                last: bool = True) -> dict | None:
    """Publish the output of one input shard, or of its `part`-th run of `rows_per_commit`
    samples (`last`: no samples follow); None if that part is already committed.

    `table` has key (string), captions (list<string>), embedding (fixed_size_list, any float
    type: cast to the cache's embedding_dtype), optional label (int64) and metadata columns.
    """
    name = part_name(input_url, part)
    commit_path = _record_path(cache, name)
    if file_exists(cache.fs, commit_path):
        return None
    if cache.complete:
        raise CacheError(f"{cache.url}: cache is complete (finalized) and takes no more shards; "
                         f"a changed dataset gets a new cache from `litpipe precompute`")
    table, dim = _conform(cache, table, input_url)
    record = {
        "name": name,
        "input": input_url,
        "part": part,
        "last": last,
        **_write_data(cache, name, table),
        "dim": dim,
        "committed": _now(),
        "errors": [{"key": str(e["key"]), "input": e.get("input", input_url), "reason": str(e["reason"])}
                   for e in errors],
    }
    make_folder(cache.fs, _join(cache.path, "commits"))
    if not write_exclusive(cache.fs, commit_path, _dumps(record)):
        cache.fs.rm_file(_join(cache.path, record["path"]))  # lost the race: the winner's shard stands
        return None
    return record


def _write_data(cache: EmbeddingCache, name: str, table: pa.Table) -> dict:
    """Write a part's data file under a writer-unique name; the record's fields that describe it."""
    data_path = f"shards/{name}.{uuid.uuid4().hex[:12]}.parquet"
    blob = _parquet_bytes(table, cache.manifest["row_group_rows"])
    make_folder(cache.fs, _join(cache.path, "shards"))
    try:
        cache.fs.pipe_file(_join(cache.path, data_path), blob)
    except OSError as err:  # a full disk leaves part of the file, which no record will ever name
        with contextlib.suppress(OSError):
            cache.fs.rm_file(_join(cache.path, data_path))
        raise naming(err, _join(cache.url, data_path)) from err
    row_groups = _row_group_rows(blob)
    record = {"path": data_path, "rows": table.num_rows, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
              "columns": table.column_names, "row_groups": row_groups}
    uncaptioned = _uncaptioned(table, row_groups)
    return {**record, "uncaptioned": uncaptioned} if any(uncaptioned) else record


def rewrite_part(cache: EmbeddingCache, record: dict, rows: list[int], reasons: list[str]) -> dict:
    """A committed part's record, its data file written again (in this cache's folder) without
    `rows`, each recorded as skipped with its reason; the old file is the caller's to delete."""
    table = read_part(cache, open_part(cache, record, whole=True), record, record["columns"])  # every column: one GET
    keys = table.column("key").to_pylist()
    keep = np.ones(table.num_rows, bool)
    keep[rows] = False
    skipped = [{"key": keys[row], "input": record["input"], "reason": reason} for row, reason in zip(rows, reasons)]
    rewritten = {k: v for k, v in record.items() if k != "owner"}
    rewritten.update(_write_data(cache, record["name"], table.filter(keep)), duplicates_dropped=len(rows),
                     errors=record.get("errors", []) + skipped)
    # The part's own record names the new file from now on (taking over an adopted one), so the
    # cache reads the same if it becomes partial again (`uncommit`).
    make_folder(cache.fs, _join(cache.path, "commits"))
    commit_path = _record_path(cache, record["name"])
    write_atomic(cache.fs, commit_path, _dumps(rewritten))
    return rewritten


def adopt(cache: EmbeddingCache, parts: list[tuple[dict, EmbeddingCache, list[dict]]]) -> None:
    """Commit parts other caches of the same encoder already embedded from the same input bytes,
    each `(record, donor, its skipped samples)`: records naming the donors' data files (no copy),
    written as a few batch records (`commits/adopted-*.json`, ADOPT_BATCH parts each): one PUT per
    batch, not per part, so a view over 10,000 shards is committed and opened in a few requests.
    A part also committed otherwise keeps that record (`_commit_records`)."""
    if cache.complete:
        raise CacheError(f"{cache.url}: cache is complete (finalized) and takes no more shards")
    records = []
    for record, donor, errors in parts:
        adopted = {**{k: v for k, v in record.items() if k != "num_errors"}, "errors": errors,
                   "owner": donor.owner(record)}
        if adopted["owner"] == cache.id:  # a file of this folder that another cache had borrowed
            del adopted["owner"]
        records.append(adopted)
    if records:
        make_folder(cache.fs, _join(cache.path, "commits"))
    for start in range(0, len(records), ADOPT_BATCH):
        batch = records[start:start + ADOPT_BATCH]
        write_exclusive(cache.fs, _join(cache.path, "commits", _batch_name(batch)),
                              _dumps({"adopted": batch, "committed": _now()}))  # the same batch twice: one stands


def uncommit(cache: EmbeddingCache, name: str) -> dict:
    """Take the committed part `name` back out, so the next `litpipe precompute` embeds it again
    (a complete cache becomes partial first); its record. The data file is the caller's to
    delete (`sharing.remove_part`): another cache may name it."""
    record = next((r for r in cache.parts() if r["name"] == name), None)
    if record is None:
        raise CacheError(f"{cache.url}: no committed part named {name!r}; `litpipe cache show {cache.id}` lists them")
    if cache.complete:
        manifest = {k: v for k, v in cache.manifest.items() if k not in FINALIZED_KEYS}
        write_atomic(cache.fs, _join(cache.path, MANIFEST), _dumps({**manifest, "complete": False}))
        cache.manifest = {**manifest, "complete": False}
    commits = _join(cache.path, "commits")
    for path in ls_or_empty(cache.fs, commits):
        if path.endswith(f"/{name}.json"):
            cache.fs.rm_file(path)
        elif _is_batch(path):
            batch = json.loads(cache.fs.cat_file(path))
            kept = [r for r in batch["adopted"] if r["name"] != name]
            if len(kept) < len(batch["adopted"]):  # the batch again, less this part, then the old one goes
                if kept:
                    write_exclusive(cache.fs, _join(commits, _batch_name(kept)), _dumps({**batch, "adopted": kept}))
                cache.fs.rm_file(path)
    return record


def _conform(cache: EmbeddingCache, table: pa.Table, input_url: str) -> tuple[pa.Table, int]:
    """Check the columns and cast them to the cache's schema, so every shard reads alike."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise CacheError(f"shard of {input_url}: missing column(s) {', '.join(missing)}; a shard needs "
                         f"key, captions and embedding")
    emb_type = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(emb_type):
        raise CacheError(f"shard of {input_url}: `embedding` is {emb_type}; it must be fixed_size_list<float, D> "
                         f"(pa.FixedSizeListArray.from_arrays(values, D))")
    dim = cache.dim
    if dim is not None and emb_type.list_size != dim:
        raise CacheError(f"shard of {input_url}: embedding dim {emb_type.list_size} differs from the cache's {dim} "
                         f"({cache.manifest_url}); the encoder fingerprint's dim is wrong or the shard is from another encoder")
    if pc.count_distinct(table.column("key")).as_py() != table.num_rows:
        raise CacheError(f"shard of {input_url}: duplicate keys; keys must be unique in the cache")
    vectors = table.column("embedding").combine_chunks()
    if vectors.null_count or vectors.flatten().null_count:
        raise CacheError(f"shard of {input_url}: null embeddings; report failed samples as errors instead")
    target = {"key": pa.string(), "captions": pa.list_(pa.string()), "label": pa.int64()}
    fields = [pa.field(f.name, target.get(f.name, f.type)) for f in table.schema if f.name != "embedding"]
    try:
        table = table.drop_columns(["embedding"]).cast(pa.schema(fields))
        stored = encode_embeddings(vectors, cache.embedding_dtype)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise CacheError(f"shard of {input_url}: columns do not fit the cache schema ({err})") from None
    field = pa.field("embedding", stored.type, nullable=False,
                     metadata={"litpipe.dtype": cache.embedding_dtype, "litpipe.dim": str(emb_type.list_size)})
    return table.add_column(table.schema.get_field_index("captions") + 1, field, stored), emb_type.list_size


def finalize(cache: EmbeddingCache, expected_inputs=None) -> dict:
    """Fold the commit records into the manifest (complete=True) and write errors.jsonl; a key
    repeated across parts stays in the first only (`duplicates.py`). The manifest, less its records
    (`cache.parts()` has them).

    With `expected_inputs`, refuse while any of them is not committed yet. The records pass through one
    at a time and the files are written a piece at a time: this process holds where each record's line
    is (`records.Spool`, 16 bytes a part), never a dict a part or a whole file.
    """
    if cache.complete:
        return cache.manifest
    records = cache.parts()
    if expected_inputs is not None:
        missing = sorted(set(expected_inputs) - cache.committed_inputs())
        if missing:
            raise CacheError(f"{cache.url}: cannot finalize, {len(missing)} input shard(s) not committed "
                             f"(first: {missing[0]}); re-run `litpipe precompute` to finish them")
    before = records
    try:
        records, rewritten = _drop_later_copies(cache, before)
    except (OSError, CacheError):  # a finalize beside this one rewrote a part and removed a file this one read
        done = EmbeddingCache.open(cache.url)
        if not done.complete:
            raise
        cache.finalized(done.manifest, done.parts())
        return cache.manifest
    reasons, totals = Counter(), Counter()

    def error_lines():  # errors.jsonl, a record at a time, and the totals on the way
        for record in records:
            totals.update(rows=record["rows"], bytes=record["bytes"])
            for error in record["errors"]:
                reasons[error["reason"]] += 1
                # Keys sorted: a record read back from its file and one made in this process write the same line.
                yield json.dumps(error, sort_keys=True).encode() + b"\n"

    write_atomic(cache.fs, _join(cache.path, ERRORS_FILE), error_lines())
    manifest = {**cache.manifest, "complete": True, "completed": _now(), "dim": cache.dim, "num_rows": totals["rows"],
                "bytes": totals["bytes"], "num_errors": sum(reasons.values()), "error_counts": dict(reasons)}
    shards = PartRecords(record_line(_without_errors(record)) for record in records)
    write_atomic(cache.fs, _join(cache.path, MANIFEST), manifest_chunks(_dumps(manifest), shards))
    cache.finalized(manifest, shards)
    # The files of parts rewritten without their duplicates go, unless a cache names them.
    replaced = {(cache.owner(record), record["path"]) for record in map(before.__getitem__, rewritten)}
    named = referenced_files(list_caches(to_url(cache.fs, cache.root)), among=replaced) if replaced else {}
    for owner, path in sorted(replaced - named.keys()):
        with contextlib.suppress(FileNotFoundError):  # a finalize running beside this one took it
            cache.fs.rm_file(_join(cache.root, owner, path))
    return cache.manifest


def _without_errors(record: dict) -> dict:
    """A part's record as the manifest lists it: its skip records are in errors.jsonl, their number here."""
    record["num_errors"] = len(record.pop("errors"))
    return record


def _drop_later_copies(cache: EmbeddingCache, records: PartRecords) -> tuple[PartRecords, np.ndarray]:
    """`records` with each part holding a later copy of a key rewritten without it (spread, one part a
    call, taken up as earlier rewrites end); the indices of the parts rewritten."""
    later = later_duplicates(cache, records)
    reasons = {first: duplicate_reason(records[first]["input"]) for _, firsts in later.values() for first in set(firsts.tolist())}
    calls = ((records[i], rows.tolist(), [reasons[first] for first in firsts.tolist()]) for i, (rows, firsts) in later.items())

    def rewritten():
        for n, record in spread_as_done(cache, rewrite_part, calls):
            cache.remember_record(_record_path(cache, record["name"]), record)
            yield indices[n], record_line(record)

    indices = np.fromiter(later, np.int64, len(later))
    return records.replaced(rewritten()), indices


def _record_path(cache: EmbeddingCache, name: str) -> str:
    """A part's own commit record file."""
    return _join(cache.path, "commits", f"{name}.json")


def _batch_name(records: list[dict]) -> str:
    """An adoption batch record's file name: a digest of what it names, so the same batch twice is one file."""
    digest = hashlib.sha256(canonical_json([(r["name"], r.get("owner"), r["path"]) for r in records]).encode())
    return f"adopted-{digest.hexdigest()[:16]}.json"


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
