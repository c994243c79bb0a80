"""The precompute driver's peak RSS while it fingerprints the locked tower, side by side in one run:
building the tower in the driver (what `litpipe precompute` did before) against `describe_encoder`
(a Ray worker builds it, reports the fingerprint and exits). ViT-L-14 by default, from a checkpoint
this script saves (random init: no weights can be downloaded here). Each way runs in a fresh process.

    .venv/bin/python bench/driver_memory.py [--model ViT-L-14] [--dir /tmp/litpipe-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, time
from litpipe.config import validate_config
mode, model, checkpoint = sys.argv[1:4]
cfg = validate_config({"data": {"train": {"format": "webdataset", "urls": "unused.tar"}}, "store": {"root": "unused"},
                       "encoder": {"model": model, "pretrained": checkpoint}})
start = time.perf_counter()
if mode == "driver":
    from litpipe.models.image_encoder import load_encoder
    fingerprint = load_encoder(cfg.encoder, device="cpu").fingerprint
else:
    from litpipe.precompute.job import describe_encoder
    from litpipe.ray_cluster import init_ray
    init_ray(cfg.ray)
    start = time.perf_counter()
    fingerprint = describe_encoder(cfg).fingerprint
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"mode": mode, "peak_rss_mb": round(peak, 1), "seconds": round(time.perf_counter() - start, 1),
                  "weights_sha256": fingerprint["weights_sha256"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--dir", default="/tmp/litpipe-bench")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    checkpoint = os.path.join(args.dir, f"{args.model}-random.pt")
    if not os.path.exists(checkpoint):
        import open_clip
        import torch

        torch.save(open_clip.create_model(args.model).state_dict(), checkpoint + ".tmp")
        os.replace(checkpoint + ".tmp", checkpoint)
    print(f"{checkpoint}: {os.path.getsize(checkpoint) / 2**30:.2f} GiB", flush=True)
    results = []
    for mode in ("driver", "worker"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, args.model, checkpoint], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        where = "built in the driver (before)" if mode == "driver" else "describe_encoder (a Ray worker)"
        print(f"{args.model}, {where:32}: driver peak RSS {results[-1]['peak_rss_mb']:8.1f} MB, "
              f"fingerprint in {results[-1]['seconds']:5.1f} s", flush=True)
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"], "the two ways fingerprint differently"
    print(json.dumps({"model": args.model, "runs": results}))


if __name__ == "__main__":
    main()
