"""Keys repeated across input shards: the first in input order is kept, each later one is skipped.

Crawls that were merged or re-run hold the same `__key__` in several shards. A read task sees one
shard (it applies the rule inside it, `sources.iter_shard`) and encoder actors commit parts in any
order, so across shards the rule is applied to the committed parts, whose order (input, part, row)
is fixed: `commits.finalize` rewrites each part holding a later copy without it and records
that copy as skipped ("duplicate key: first in SHARD"). Readers, exports and verify then see each key
once, and a resumed or re-planned run finalizes to the same rows.

The key columns of every part are grouped in Arrow (C++, no Python object per key): memory is about
the keys' bytes plus 16 bytes a row, read from the store one small column chunk per part.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from litpipe.store.parts import open_part, read_part

READ_THREADS = 16  # key columns read at once: on an object store each is a round trip or two


def later_duplicates(cache, records: list[dict]) -> dict[int, list[tuple[int, str]]]:
    """{index in `records` of a part holding later copies: [(row, input URL of the first copy)]};
    `records` in input order, as `EmbeddingCache.parts()` lists them."""
    def keys(record: dict) -> pa.Array:
        return read_part(cache, open_part(cache, record), record, ["key"]).column("key").combine_chunks()

    with ThreadPoolExecutor(READ_THREADS) as pool:
        columns = list(pool.map(keys, records))
    if not columns:
        return {}
    # ordinal = part index << 32 | row: its minimum over a key is the key's first copy in input order
    ordinals = np.concatenate([(np.int64(i) << 32) + np.arange(len(c), dtype=np.int64) for i, c in enumerate(columns)])
    table = pa.table({"key": pa.chunked_array(columns, pa.string()), "ordinal": ordinals})
    grouped = table.group_by("key", use_threads=False).aggregate([("ordinal", "min"), ("ordinal", "count")])
    repeated = grouped.filter(pc.greater(grouped["ordinal_count"], 1))
    if not repeated.num_rows:
        return {}
    first = dict(zip(repeated["key"].to_pylist(), repeated["ordinal_min"].to_pylist()))
    copies = table.filter(pc.is_in(table["key"], value_set=repeated["key"]))
    later: dict[int, list[tuple[int, str]]] = {}
    for key, ordinal in zip(copies["key"].to_pylist(), copies["ordinal"].to_pylist()):
        if ordinal != first[key]:
            later.setdefault(ordinal >> 32, []).append((ordinal & 0xFFFFFFFF, records[first[key] >> 32]["input"]))
    return later
