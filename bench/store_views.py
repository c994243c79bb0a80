"""Caches as views over shards, at scale, on an S3 protocol server (moto on 127.0.0.1): with a complete
cache of --shards input shards under the store, a cache of the grown dataset (those shards plus --new)
adopts the old ones; timed: opening the old cache, adopting (one commit record per shard, written 16 at
a time), opening the new view while partial (a listing plus one GET per record) and finalizing it.

The old cache is written as finalize would leave it (one manifest holding every shard record); its data
files are not written, since opening and adopting read records, never data.

    .venv/bin/python bench/store_views.py [--shards 10000] [--new 100]
"""

from __future__ import annotations

import argparse
import json
import time

from moto_s3 import moto_s3

from litpipe.store import EmbeddingCache
from litpipe.store.sharing import adopt_from_other_caches

ENCODER = {"model": "bench", "weights_sha256": "0" * 64, "dim": 512}


def timed(results: dict, name: str, fn):
    start = time.perf_counter()
    value = fn()
    results[name] = round(time.perf_counter() - start, 2)
    print(f"{name:34} {results[name]:8.2f} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--new", type=int, default=100)
    args = parser.parse_args()
    inputs = [{"url": f"s3://bench/data/shard-{i:06d}.tar", "size": 1000 + i, "etag": f"e{i}"}
              for i in range(args.shards + args.new)]
    with moto_s3() as fs:
        root = "s3://bench/store"
        old = EmbeddingCache.open_or_create(root, ENCODER, {"format": "webdataset", "options": {},
                                                            "inputs": inputs[:args.shards]})
        records = [{"name": f"shard-{i:06d}", "path": f"shards/shard-{i:06d}.x.parquet", "input": e["url"], "part": 0,
                    "last": True, "rows": 4096, "bytes": 4_300_000, "sha256": "0" * 64, "dim": 512,
                    "columns": ["key", "captions", "embedding", "metadata"], "row_groups": [4096],
                    "committed": "2026-12-01T00:00:00+00:00", "num_errors": 0} for i, e in enumerate(inputs[:args.shards])]
        fs.pipe(f"{old.path}/manifest.json", json.dumps({**old.manifest, "complete": True, "shards": records,
                                                         "num_errors": 0}).encode())
        fs.pipe(f"{old.path}/errors.jsonl", b"")
        results = {"shards": args.shards, "new": args.new}
        opened = timed(results, "open the old cache", lambda: EmbeddingCache.open(old.url))
        assert len(opened.parts()) == args.shards
        view = EmbeddingCache.open_or_create(root, ENCODER, {"format": "webdataset", "options": {}, "inputs": inputs})
        adopted = timed(results, f"adopt {args.shards:,} shards", lambda: adopt_from_other_caches(view, [e["url"] for e in inputs]))
        assert len(adopted) == args.shards
        fs.invalidate_cache()
        timed(results, "open the view (partial) + records", lambda: len(EmbeddingCache.open(view.url).parts()))
        print(json.dumps(results))


if __name__ == "__main__":
    main()
