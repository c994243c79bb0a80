"""Precompute throughput, measured side by side in one run on one device, model and batch size:

(a) the encoder's bare forward on already-preprocessed tensors, (b) the whole pipeline from tar shards
to committed Parquet (Ray), the ratio (b)/(a) (goal on a GPU: >= 0.9), and (c) decode + preprocess
images/s on one CPU. `--encoder-only` skips Ray and the pipeline, for a GPU machine without Ray.

    python bench/precompute.py                                   # CPU, the demo's tiny encoder
    python bench/precompute.py --encoder-only --model ViT-B-32 --precision bf16 --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from litpipe.config import EncoderConfig, validate_config
from litpipe.precompute.decode import decode_and_preprocess
from litpipe.models.image_encoder import load_encoder

DEMO_ARCHITECTURE = {  # pipeline.yaml's demo encoder
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def jpeg(seed: int, size=(320, 240)) -> bytes:
    """A photo-sized JPEG with some structure (smooth gradients plus noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) % 256], -1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def bare_forward(encoder, batch_size: int, batches: int) -> float:
    """(a) images/s of `encode` on preprocessed tensors already in host memory."""
    images = torch.randn(batch_size, 3, *encoder.image_size)
    encoder.encode(images)  # warm-up (kernels, autocast caches)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode(images)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * batches / (time.perf_counter() - start)


def decode_per_cpu(encoder, samples: list[bytes]) -> float:
    """(c) images/s of decode + open_clip preprocess in this one process (one CPU)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    for data in samples:
        decode_and_preprocess(data, encoder.preprocess, 89_478_485)
    seconds = time.perf_counter() - start
    torch.set_num_threads(os.cpu_count() or 1)
    return len(samples) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="litpipe-tiny-vit", help="open_clip model (default: the demo's tiny ViT)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=4096, help="images through the pipeline")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--forward-batches", type=int, default=10)
    parser.add_argument("--encoder-only", action="store_true", help="only (a) and (c): no Ray, no pipeline")
    args = parser.parse_args()

    architecture = DEMO_ARCHITECTURE if args.model == "litpipe-tiny-vit" else None
    encoder_cfg = EncoderConfig(model=args.model, architecture=architecture, precision=args.precision, device=args.device)
    encoder = load_encoder(encoder_cfg)
    samples = [jpeg(i) for i in range(min(args.images, 256))]
    print(f"device {encoder.device} ({torch.cuda.get_device_name() if encoder.device.type == 'cuda' else 'CPU'}), "
          f"{os.cpu_count()} CPUs, model {args.model}, precision {encoder.precision}, batch {args.batch_size}, "
          f"input {encoder.image_size[0]}px from 320x240 JPEGs")
    forward = bare_forward(encoder, args.batch_size, args.forward_batches)
    print(f"(a) bare encoder forward:         {forward:10.1f} images/s")
    decode = decode_per_cpu(encoder, samples)
    print(f"(c) decode + preprocess per CPU:  {decode:10.1f} images/s")
    if args.encoder_only:
        return 0
    whole, steady, cpus = run_pipeline(args, encoder_cfg, samples)
    print(f"(b) whole pipeline tar -> Parquet: {whole:10.1f} images/s ({cpus} CPUs in Ray, actor start included)")
    print(f"    after the first commit:      {steady:10.1f} images/s (steady state)")
    print(f"ratio (b)/(a): {whole / forward:.2f} whole run, {steady / forward:.2f} steady state")
    return 0


def run_pipeline(args, encoder_cfg: EncoderConfig, samples: list[bytes]) -> tuple[float, float, int]:
    """(b): real tar shards in a temp folder -> a fresh cache; Ray startup is not counted. Also the
    steady state: images/s between the first and the last commit, past the encoder actor's start."""
    from litpipe.precompute.job import precompute_dataset
    from litpipe.ray_cluster import init_ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from precompute_samples import sample_members, write_tar

    with tempfile.TemporaryDirectory() as tmp:
        per_shard = args.images // args.shards
        for s in range(args.shards):
            write_tar(f"{tmp}/bench-{s:06d}.tar", [m for i in range(per_shard)
                                                   for m in sample_members(f"{s}/{i}", samples[(s * per_shard + i) % len(samples)],
                                                                           f"image {i}", ext="jpg")])
        cfg = validate_config({"data": {"train": {"format": "webdataset", "urls": f"{tmp}/bench-*.tar"}},
                               "encoder": encoder_cfg.model_dump(), "store": {"root": f"{tmp}/store"},
                               "precompute": {"batch_size": args.batch_size}})
        ray = init_ray(cfg.ray)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        encoder = load_encoder(cfg.encoder, device="cpu")
        commits = []
        result = precompute_dataset(cfg, "train", encoder, on_commit=lambda r: commits.append((time.perf_counter(), r["rows"])))
        steady = sum(rows for _, rows in commits[1:]) / (commits[-1][0] - commits[0][0])
        return result["images_per_s"], steady, cpus


if __name__ == "__main__":
    sys.exit(main())
