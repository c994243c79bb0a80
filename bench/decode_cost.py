"""CPU cost per image on the way to the accelerator, per core, and the cores a node needs per GPU.

For each source size, one WebDataset shard of JPEGs (smooth content with noise, quality 90, as a
photo compresses) is read by the precompute read task itself (`read_parts`: stream the tar, cut
parts, decode, pickle) in this process, one thread, and each part is then loaded as the encoder
actor loads it (`load_part`). CPU seconds per image (process time) for each path:

- `pil`: decode + open_clip's eval transform up to ToTensor (resize 224 bicubic, centre crop) on the CPU;
- `pil + draft`: the same with libjpeg's DCT-domain downscaling first (`encoder.jpeg_draft`);
- `tensor`: decode + the integer box shrink only (the device resizes); `tensor + draft` with libjpeg's downscale;
- `device`: the JPEG bytes travel encoded (header checked, bytes copied); the GPU decodes.

From the per-core rates, the cores that feed one H100 at its bare-forward rate for ViT-B/32 and
ViT-L/14 (--rates; published bf16 figures on recent cards are about 18,000 and 1,200 images/s).

    .venv/bin/python bench/decode_cost.py [--sizes 256x256 512x384 1600x1200] [--images 400] [--json F]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
from PIL import Image

from litpipe.config import DatasetConfig
from litpipe.models.cpu_pixels import CpuPixels, draft_side
from litpipe.precompute.read import load_part, read_parts

SIZE = 224


def photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([x, y, x * y], -1) * rng.uniform(80, 255, 3) + rng.normal(0, 10, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def shard(folder: Path, width: int, height: int, images: int) -> Path:
    path = folder / f"{width}x{height}.tar"
    pool = [photo(width, height, seed) for seed in range(16)]
    with tarfile.open(path, "w") as tar:
        for i in range(images):
            for ext, data in (("jpg", pool[i % 16]), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def pil_steps() -> list:
    steps = list(open_clip.image_transform(SIZE, is_train=False).transforms)
    return steps[:next(i for i, s in enumerate(steps) if "ToTensor" in type(s).__name__)]


def cost(path: Path, pixels: CpuPixels, on_device: bool, draft: bool, repeats: int) -> dict:
    """Median over `repeats` of CPU seconds per image: the read task's, then the encoder's load."""
    dataset = DatasetConfig(format="webdataset", urls=str(path))
    pixels = CpuPixels(pixels.mode, pixels.size, pixels.pil_steps,
                       draft_to=draft_side(pixels.mode, pixels.size, SIZE) if draft else None)
    row = pa.table({"dataset": ["d"], "input": [str(path)], "skip": [[]]})
    reads, loads = [], []
    for _ in range(repeats):
        start, images, tables = time.process_time(), 0, []
        for table in read_parts(row, {"d": dataset}, {"d": 256}, pixels, 10**9, on_device, yield_cpu=False, read_retries=0):
            tables.append(table)
        read = time.process_time() - start
        start = time.process_time()
        for table in tables:
            images += len(load_part(table["payload"][0], table["buffers"][0]))
        loads.append((time.process_time() - start) / images)
        reads.append(read / images)
    return {"read_ms": round(1000 * float(np.median(reads)), 3), "load_ms": round(1000 * float(np.median(loads)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["256x256", "512x384", "1600x1200"])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rates", nargs=2, type=float, default=[18_000, 1_200], metavar=("VIT_B32", "VIT_L14"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = {"pil": (CpuPixels("pil", (SIZE, SIZE), pil_steps()), False, False),
             "pil + draft": (CpuPixels("pil", (SIZE, SIZE), pil_steps()), False, True),
             "tensor": (CpuPixels("tensor", (SIZE, SIZE), []), False, False),
             "tensor + draft": (CpuPixels("tensor", (SIZE, SIZE), []), False, True),
             "device": (CpuPixels("tensor", (SIZE, SIZE), []), True, False)}
    results = {"machine": f"{platform.processor() or platform.machine()}, {open('/proc/cpuinfo').read().count('processor')} CPUs",
               "rates": dict(zip(("ViT-B/32", "ViT-L/14"), args.rates)), "sizes": {}}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            width, height = map(int, size.split("x"))
            path = shard(Path(folder), width, height, args.images)
            kb = path.stat().st_size / args.images / 1024
            results["sizes"][size] = {"kb_per_image": round(kb, 1)}
            for name, (pixels, on_device, draft) in paths.items():
                figure = cost(path, pixels, on_device, draft, args.repeats)
                per_core = 1000 / (figure["read_ms"] + figure["load_ms"])
                figure.update(per_core=round(per_core, 1),
                              cores={model: round(rate / per_core, 1) for model, rate in zip(("ViT-B/32", "ViT-L/14"), args.rates)})
                results["sizes"][size][name] = figure
                print(f"{size:>10} {kb:6.1f} kB  {name:12} read {figure['read_ms']:7.3f} ms + load {figure['load_ms']:6.3f} ms "
                      f"per image = {per_core:7.1f} images/s per core; cores per H100: "
                      + ", ".join(f"{m} {c}" for m, c in figure["cores"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
