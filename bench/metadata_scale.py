"""Metadata at scale on an S3 protocol server (moto on 127.0.0.1): what the store costs in requests,
time and driver memory per committed part, for caches of --parts parts (commit records plus small
data files, one part per input shard, as precompute leaves them).

Each step is the store's real code on an `s3://` cache: the planner's `plan` on a partial cache
(resume), `finish` once the rest is committed (finalize, which reads every part's keys to drop keys
repeated across shards: one such key is planted), opening the complete cache, `verify`, `cache ls`,
a `StreamingReader`'s start and first batch, and `plan` of a grown dataset that adopts every part.
Requests are counted at the client (botocore's before-send event); peak RSS is the driver's during
the step above its RSS before it (VmHWM, reset before each). Figures per part flat across sizes =
linear growth.

    .venv/bin/python bench/metadata_scale.py [--parts 1000 10000] [--json runs/metadata_scale.json] [--local DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from types import SimpleNamespace

import fsspec
import numpy as np
import pyarrow as pa

from moto_s3 import moto_s3

from litpipe.store.maintenance import verify
from litpipe.config import validate_config
from litpipe.precompute.job import finish, plan
from litpipe.store.cache import EmbeddingCache, _dumps, list_caches
from litpipe.store.commits import _conform, _parquet_bytes, _row_group_rows
from litpipe.store.catalogue import describe
from litpipe.store.reader import StreamingReader

DIM, ROWS = 8, 4  # rows per part: the records are what is measured, the data files only need to be real
ENCODER = SimpleNamespace(fingerprint={"model": "bench", "weights_sha256": "0" * 64, "dim": DIM})
UPLOAD_BATCH = 500


class Requests:
    """Counts the S3 requests every s3fs client of this process sends (none on local disk)."""

    def __init__(self, fs):
        self.count = 0
        if hasattr(fs, "connect"):
            fs.connect(refresh=False)
            fs.s3.meta.events.register("before-send.s3", self._sent)

    def _sent(self, **_):
        self.count += 1


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def step(results: dict, name: str, parts: int, requests: Requests, fn):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current RSS
    rss, before, start = rss_mb("VmRSS"), requests.count, time.perf_counter()
    value = fn()
    seconds, sent, grew = time.perf_counter() - start, requests.count - before, rss_mb("VmHWM") - rss
    results[name] = {"seconds": round(seconds, 3), "requests": sent, "requests_per_part": round(sent / parts, 3),
                     "ms_per_part": round(seconds / parts * 1000, 3), "peak_rss_growth_mb": round(grew, 1),
                     "kb_per_part": round(grew * 1024 / parts, 2)}
    print(f"  {name:20} {seconds:8.2f} s {seconds / parts * 1000:7.3f} ms/part {sent:9,} requests "
          f"({sent / parts:6.3f}/part)  driver peak RSS +{grew:7.1f} MB ({grew * 1024 / parts:6.2f} kB/part)", flush=True)
    return value


def commit_parts(fs, cache: EmbeddingCache, inputs: list[str], start: int) -> None:
    """Data files and commit records of one part per input, as `commit_part` writes them, uploaded
    in concurrent batches (the setup is not what is measured). Input 1 repeats a key of input 0."""
    files = {}
    for i, url in enumerate(inputs, start):
        keys = [f"k{i:07d}/{row}" for row in range(ROWS)]
        if i == 1:
            keys[0] = "k0000000/0"
        vectors = np.random.default_rng(i).standard_normal((ROWS, DIM), dtype=np.float32)
        table, dim = _conform(cache, pa.table({
            "key": keys, "captions": [[f"caption {k}"] for k in keys],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)}), url)
        blob = _parquet_bytes(table, ROWS)
        name = f"in-{i:07d}-bench"
        record = {"name": name, "path": f"shards/{name}.x.parquet", "input": url, "part": 0, "last": True, "rows": ROWS,
                  "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "dim": dim,
                  "columns": table.column_names, "row_groups": _row_group_rows(blob), "committed": "2026-12-04T00:00:00+00:00",
                  "errors": []}
        files[f"{cache.path}/{record['path']}"] = blob
        files[f"{cache.path}/commits/{name}.json"] = _dumps(record)
        if len(files) >= UPLOAD_BATCH:
            fs.pipe(files)
            files = {}
    if files:
        fs.pipe(files)


def simulate(fs, root: str, data: str, parts: int, requests: Requests) -> dict:
    """The steps on a store of its own under `root`, with `parts` input shards under `data`."""
    inputs = [f"{data}/in-{i:07d}.tar" for i in range(parts)]
    fs.pipe({url: b"tar" for url in inputs + [f"{data}/in-{parts:07d}.tar"]})
    pattern = f"{data}/in-{{{0:07d}..{parts - 1:07d}}}.tar"
    cfg = validate_config({"data": {"a": {"format": "webdataset", "urls": pattern},
                                    "grown": {"format": "webdataset", "urls": f"{data}/in-*.tar"}},
                           "store": {"root": root}, "train": {"dataset": "a"}})
    resumed = parts - max(1, parts // 100)  # a killed run committed 99%
    cache = plan(cfg, "a", ENCODER).cache
    commit_parts(fs, cache, inputs[:resumed], 0)
    results = {"parts": parts}
    print(f"{parts:,} parts:", flush=True)
    step(results, "open (partial)", parts, requests, lambda: EmbeddingCache.open(cache.url).parts())
    p = step(results, "plan (resume)", parts, requests, lambda: plan(cfg, "a", ENCODER))
    assert len(p.to_encode) == parts - resumed
    commit_parts(fs, p.cache, inputs[resumed:], resumed)
    summary = step(results, "finish (finalize)", parts, requests, lambda: finish(p))
    assert summary.complete and summary.rows_in_cache == parts * ROWS - 1, summary
    step(results, "open (complete)", parts, requests, lambda: EmbeddingCache.open(cache.url).parts())
    problems = step(results, "verify", parts, requests, lambda: verify(EmbeddingCache.open(cache.url), ))
    assert problems == [], problems[:3]
    step(results, "cache ls", parts, requests, lambda: describe(list_caches(root)))
    step(results, "reader start", parts, requests,
         lambda: next(iter(StreamingReader(EmbeddingCache.open(cache.url), batch_size=64, shuffle_row_groups=16))))
    grown = step(results, "plan (adopt all)", parts, requests, lambda: plan(cfg, "grown", ENCODER))
    # Input 1 lost its repeated key to input 0 at finalize: its part depends on another shard, so it is not adopted.
    assert len(grown.adopted) == parts - 1 and sorted(grown.to_encode) == [inputs[1], f"{data}/in-{parts:07d}.tar"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument("--local", metavar="DIR", help="the store on local disk under DIR instead of moto's S3: driver "
                        "time and memory per part at sizes moto answers too slowly for (no requests counted)")
    args = parser.parse_args()
    if args.local:
        fs = fsspec.filesystem("file", auto_mkdir=True)
        results = [simulate(fs, f"{args.local}/store-{n}", f"{args.local}/data-{n}", n, Requests(fs)) for n in args.parts]
    else:
        with moto_s3() as fs:
            requests = Requests(fs)
            results = [simulate(fs, f"s3://bench/store-{n}", f"s3://bench/data-{n}", n, requests) for n in args.parts]
    print(json.dumps(results))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
