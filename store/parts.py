"""Reading a committed part: its Parquet file opened and checked against its record, and its columns
read with every page's CRC checked, each failure naming the file and the fix."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.files import is_local
from litpipe.store.cache import CacheError, EmbeddingCache, stored_dim

CHECK_PAGE_CHECKSUMS = True  # readers check each page's CRC; bench/store_read.py turns it off to measure the cost


def open_part(cache: EmbeddingCache, record: dict, whole: bool = False) -> pq.ParquetFile:
    """A shard's Parquet file; `whole` fetches it in one read (remote stores), not by ranges.

    Checks what a reader relies on: a readable footer, the recorded rows and the cache's dim.
    Pages are checked against their CRCs as they are read (`read_part`).
    """
    path, url = cache.file_path(record), cache.file_url(record)
    try:
        if is_local(cache.fs):
            source = path
        elif whole:
            source = pa.BufferReader(cache.fs.cat_file(path))
        else:
            source = cache.fs.open(path, "rb")
        parquet = pq.ParquetFile(source, memory_map=is_local(cache.fs),  # local: decode straight from the page cache
                                 page_checksum_verification=CHECK_PAGE_CHECKSUMS)
    except FileNotFoundError:
        raise CacheError(f"{url}: committed shard is missing; {repair_hint(cache, record)}") from None
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(f"{url}: unreadable Parquet shard, truncated or corrupt ({err}); {repair_hint(cache, record)}") from None
    dim = stored_dim(parquet.schema_arrow.field("embedding"), cache.embedding_dtype)
    if dim != cache.dim:
        raise CacheError(f"{url}: embedding dim {dim} differs from the cache's {cache.dim}; the shard belongs to "
                         f"another encoder: {repair_hint(cache, record)}")
    if parquet.metadata.num_rows != record["rows"]:
        raise CacheError(f"{url}: {parquet.metadata.num_rows} rows, its commit record says {record['rows']}; "
                         f"the file was replaced: {repair_hint(cache, record)}")
    return parquet


def read_part(cache: EmbeddingCache, parquet: pq.ParquetFile, record: dict, columns: list[str], group: int | None = None) -> pa.Table:
    """`columns` of an open shard (one row group of it, or all); a page whose bytes changed since
    they were written (its CRC fails) or that cannot be decoded is an error naming the file and the fix."""
    try:
        return parquet.read(columns=columns) if group is None else parquet.read_row_group(group, columns=columns)
    except (pa.ArrowInvalid, OSError) as err:
        raise CacheError(f"{cache.file_url(record)}: corrupt data in a committed shard ({err}); {repair_hint(cache, record)}") from None


def repair_hint(cache: EmbeddingCache, record: dict) -> str:
    """What to run when a committed shard's file is damaged or gone."""
    return (f"run `litpipe cache verify {cache.id}` to list every damaged file, then `litpipe cache rm {cache.id} "
            f"--part {record['name']}` and `litpipe precompute` to embed that part again")
