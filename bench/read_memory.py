"""A read task's peak memory against precompute.rows_per_commit, on one large generated tar shard.

Writes a WebDataset tar of --gigabytes of 640x480 JPEGs (img2dataset's layout: .jpg, .txt, .json),
then runs the precompute read task (`read_parts`: stream the shard, cut parts, decode on the CPU,
pickle each part) over it in a fresh process per setting, and prints that process's peak RSS
(VmHWM) beside the same process holding the whole shard's samples at once (how `read_shard` read
a shard before it streamed). Memory should follow rows_per_commit, not the shard's size.

    .venv/bin/python bench/read_memory.py [--gigabytes 2] [--rows 64 256 1024] [--dir /tmp/litpipe-bench]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from PIL import Image

CHILD = """
import json, sys, time
from litpipe.config import DatasetConfig
from litpipe.models.cpu_pixels import CpuPixels
from litpipe.precompute.read import read_parts
from litpipe.sources import iter_shard
import pyarrow as pa

url, rows = sys.argv[1], int(sys.argv[2])
dataset = DatasetConfig(format="webdataset", urls=url)
start, count = time.perf_counter(), 0
if rows:
    task = pa.table({"dataset": ["d"], "input": [url], "skip": [[]]})
    for table in read_parts(task, {"d": dataset}, {"d": rows}, CpuPixels("tensor", (224, 224), []), 10**9, False,
                            yield_cpu=False, read_retries=0):
        count += 1
        del table  # as Ray does once the part is in its object store
else:
    count = len(list(iter_shard(dataset, url)))  # every sample of the shard held at once
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"peak_rss_mb": round(peak, 1), "seconds": round(time.perf_counter() - start, 1), "count": count}))
"""


def write_shard(path: str, gigabytes: float) -> int:
    """A tar of distinct-keyed samples reusing 32 noise JPEGs (noise does not compress: ~250 kB each)."""
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(32):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), np.uint8)).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    samples, written = 0, 0
    with tarfile.open(path, "w") as tar:
        while written < gigabytes * 2**30:
            key = f"{samples:09d}"
            for ext, data in (("jpg", jpegs[samples % 32]), ("txt", f"caption {samples}".encode()),
                              ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                written += len(data) + 512
            samples += 1
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--dir", default="/tmp/litpipe-bench")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    shard = os.path.join(args.dir, f"shard-{args.gigabytes:g}GB.tar")
    start = time.perf_counter()
    samples = write_shard(shard, args.gigabytes)
    size = os.path.getsize(shard)
    print(f"{shard}: {size / 2**30:.2f} GiB, {samples:,} samples, written in {time.perf_counter() - start:.0f} s", flush=True)
    results = {"shard_bytes": size, "samples": samples, "runs": []}
    for rows in [0, *args.rows]:
        out = subprocess.run([sys.executable, "-c", CHILD, shard, str(rows)], capture_output=True, text=True, check=True)
        run = {"rows_per_commit": rows or None, **json.loads(out.stdout.strip().splitlines()[-1])}
        results["runs"].append(run)
        what = f"read_parts, rows_per_commit {rows:5}" if rows else "whole shard held (before)  "
        decoded_part_mb = rows * 480 * 640 * 3 / 2**20
        print(f"{what}: peak RSS {run['peak_rss_mb']:8.1f} MB in {run['seconds']:6.1f} s"
              + (f"  (one part decoded: {decoded_part_mb:6.0f} MB)" if rows else ""), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
