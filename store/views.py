"""Cache views: a named set of keys left out when a cache is read, never by rewriting its vectors.

A view is what LiT's "do duplicate examples matter?" needs (train without the upstream images that
near-duplicate the downstream sets) and what decontamination against eval sets needs in general:
one encode, read with and without the rows. Its fingerprint (the rule and the sha256 of the sorted
keys) is recorded by the run that trained on it, so two runs say whether they saw the same rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from litpipe.store.cache import EmbeddingCache
from litpipe.store.parts import open_part, read_part


@dataclass(frozen=True)
class CacheView:
    name: str
    excluded: frozenset[str]  # keys whose rows are left out
    rule: dict  # what chose them (keys files, near-duplicates of which caches at which threshold)

    @property
    def fingerprint(self) -> dict:
        digest = hashlib.sha256("\n".join(sorted(self.excluded)).encode()).hexdigest()
        return {"name": self.name, "rule": self.rule, "excluded": len(self.excluded), "keys_sha256": digest}

    def rows_left_out(self, cache: EmbeddingCache, records: list[dict]) -> dict[tuple[int, int], np.ndarray]:
        """(part, row group) -> the rows of it this view leaves out, among those with a caption (the
        reader leaves the others out anyway); read from the parts' key columns, once per reader."""
        wanted = pa.array(sorted(self.excluded), pa.string())
        left_out = {}
        for s, record in enumerate(records):
            parquet = open_part(cache, record)
            try:
                for g in range(len(record["row_groups"])):
                    table = read_part(cache, parquet, record, ["key", "captions"], g)
                    hit = pc.is_in(table.column("key"), value_set=wanted).to_numpy(zero_copy_only=False)
                    hit &= pc.fill_null(pc.list_value_length(table.column("captions")), 0).to_numpy() > 0
                    if hit.any():
                        left_out[(s, g)] = np.flatnonzero(hit)
            finally:
                parquet.close(force=True)
        return left_out
