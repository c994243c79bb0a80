"""Listing a dataset's inputs, measured side by side in one run: one request per file (how inputs
were listed and fingerprinted before: an exists and an info per file, serially) against
`litpipe.files.list_files` (one listing per folder, folders in parallel), on 10,000 local files
and on 10,000 objects of an S3 protocol server (moto, started here on 127.0.0.1). Prints the time
per 1,000 files of each (median of --repeats) and their ratio.

    .venv/bin/python bench/listing.py [--files 10000] [--repeats 3] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import fsspec

from litpipe.files import list_files
from moto_s3 import moto_s3


def one_request_per_file(pattern: str, count: int) -> None:
    for i in range(count):
        url = pattern.format(i)
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            fs.info(path)


def per_thousand(repeats: int, count: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / count * 1000


def measure(name: str, pattern: str, braces: str, count: int, repeats: int, invalidate) -> dict:
    def before():
        invalidate()
        one_request_per_file(pattern, count)

    def after():
        invalidate()
        assert len(list_files(braces)) == count

    result = {"where": name, "files": count, "before_s_per_1000": per_thousand(repeats, count, before),
              "after_s_per_1000": per_thousand(repeats, count, after)}
    result["speedup"] = result["before_s_per_1000"] / result["after_s_per_1000"]
    print(f"{name:6} {count:,} files: one request per file {result['before_s_per_1000']:8.3f} s per 1,000, "
          f"list_files {result['after_s_per_1000']:8.4f} s per 1,000: ratio {result['speedup']:.1f}x", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="folder for the local files, created if missing (default: a temporary folder)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.abspath(args.dir or tmp)
        os.makedirs(folder, exist_ok=True)
        for i in range(args.files):
            with open(f"{folder}/shard-{i:06d}.tar", "wb") as f:
                f.write(b"x")
        results.append(measure("local", f"{folder}/shard-{{:06d}}.tar", f"{folder}/shard-{{000000..{args.files - 1:06d}}}.tar",
                               args.files, args.repeats, lambda: None))
    results.append(measure_s3(args.files, args.repeats))
    print(json.dumps(results))


def measure_s3(count: int, repeats: int) -> dict:
    with moto_s3() as fs:
        fs.pipe({f"bench/shards/shard-{i:06d}.tar": b"x" for i in range(count)})
        return measure("s3", "s3://bench/shards/shard-{:06d}.tar", f"s3://bench/shards/shard-{{000000..{count - 1:06d}}}.tar",
                       count, repeats, lambda: fs.invalidate_cache())


if __name__ == "__main__":
    main()
