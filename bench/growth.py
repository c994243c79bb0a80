"""A dataset that grows: v1 (--shards input shards) is precomputed once, then v2 = v1 + k new shards,
for each k, into a copy of v1's store, all in one run with one local Ray. v2 adopts v1's shards and
encodes only the k new ones, so its time is Ray Data's fixed start-up plus a cost per new shard:
printed per k with the images encoded, and the slope fitted over k.

    .venv/bin/python bench/growth.py [--shards 8] [--images 256] [--ks 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from precompute_samples import image_bytes, sample_members, tiny_config, write_tar  # noqa: E402

from litpipe.config import validate_config  # noqa: E402
from litpipe.precompute import stage  # noqa: E402
from litpipe.precompute.results import DatasetResult  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--images", type=int, default=256, help="images per shard (64x48 PNGs)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()
    total = args.shards + max(args.ks)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for s in range(total):
            write_tar(data / f"part-{s:06d}.tar", [m for i in range(args.images) for m in
                                                   sample_members(f"{s}/{i}", image_bytes(s * args.images + i, (64, 48)), "x")])

        def run(count: int, root: str) -> tuple[float, DatasetResult]:
            dataset = {"format": "webdataset", "urls": str(data / f"part-{{000000..{count - 1:06d}}}.tar")}
            cfg = validate_config(tiny_config({"d": dataset}, root, train={"dataset": "d"}))
            start = time.perf_counter()
            result = stage.run(cfg).datasets["d"]
            return time.perf_counter() - start, result

        v1_root = f"{tmp}/v1"
        seconds, result = run(args.shards, v1_root)
        print(f"v1: {args.shards} shards, {result.embedded} images encoded in {seconds:.1f} s", flush=True)
        rows = []
        for k in args.ks:
            root = f"{tmp}/k{k}"
            shutil.copytree(v1_root, root)
            seconds, result = run(args.shards + k, root)
            rows.append({"k": k, "seconds": round(seconds, 2), "encoded": result.embedded,
                         "adopted_shards": result.inputs_reused})
            print(f"v2 = v1 + {k}: {result.embedded} images encoded, {result.inputs_reused} shards adopted, "
                  f"{seconds:.1f} s", flush=True)
        slope, intercept = np.polyfit([r["k"] for r in rows], [r["seconds"] for r in rows], 1)
        print(f"time = {intercept:.1f} s + {slope:.2f} s per new shard")
        print(json.dumps({"v1_shards": args.shards, "images_per_shard": args.images, "rows": rows,
                          "seconds_per_new_shard": round(slope, 3), "fixed_seconds": round(intercept, 2)}))


if __name__ == "__main__":
    main()
