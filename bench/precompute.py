"""Precompute throughput, measured side by side in one run on one device, model and batch size:

(a) the encoder's bare forward on already-preprocessed tensors, in this process as a plain script
runs it and (a') in a fresh process with the encoder actor's allocator settings
(`keep_freed_memory_env`), (b) the whole pipeline from tar shards of ~640x480 JPEGs to committed
Parquet (Ray start-up excluded, actor start-up included), the ratios (b)/(a) and (b)/(a'), (c) decode + CPU preprocessing images/s on one CPU, and the driver's cost: its
CPU share and peak RSS, and (d) its CPU per committed part between the first and last commit of a
run with the demo's tiny encoder cut into 16-sample parts (many parts per second), from which its
CPU seconds per 100,000 images at the default 4,096 samples per part follow (it only schedules and
counts: the goal is < 1 s). `--encoder-only` skips Ray and the pipeline, for a GPU machine without Ray.

    python bench/precompute.py                                          # CPU, ViT-B-32, 2,048 JPEGs
    python bench/precompute.py --model litpipe-tiny-vit --images 4096   # the demo's tiny encoder
    python bench/precompute.py --encoder-only --precision bf16 --batch-size 256
    python bench/precompute.py --source timm --model vit_base_patch16_224 --images 256 --batch-size 32
    python bench/precompute.py --source hf --model dinov2-small --images 256 --batch-size 32

Weights are random (none can be downloaded here): throughput does not depend on them. `--source hf
--model dinov2-small` saves a random DINOv2-S (ViT-S/14, 224 px after a 256 px resize, as
facebook/dinov2-small) to a temp folder first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from litpipe.config import EncoderConfig, validate_config
from litpipe.devices import keep_freed_memory_env
from litpipe.models.image_encoder import load_encoder
from litpipe.images import decode_image

DEMO_ARCHITECTURE = {  # pipeline.yaml's demo encoder
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def jpeg(seed: int, size=(640, 480)) -> bytes:
    """A photo-sized JPEG with some structure (smooth gradients, a few shapes, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x * y / 97 + seed * 13) % 256], -1)
    for _ in range(3):
        cy, cx, r = rng.integers(0, size[1]), rng.integers(0, size[0]), rng.integers(20, 120)
        base[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
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
    """(c) images/s of decode + the CPU step of the configured preprocessing, in this one process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for data in samples:
        encoder.pixels.cpu_step.cpu(decode_image(data, 89_478_485))
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return len(samples) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="open_clip", choices=["open_clip", "timm", "hf"])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model, or litpipe-tiny-vit (the demo's); a timm "
                        "model; a Hugging Face folder or `dinov2-small` (a random DINOv2-S)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--preprocess", default="tensor", choices=["tensor", "pil"])
    parser.add_argument("--jpeg-decode", default="auto", choices=["auto", "cpu", "device"],
                        help="encoder.jpeg_decode: auto decodes JPEGs on the GPU where there is one")
    parser.add_argument("--no-driver-cost", action="store_true", help="skip (d), the driver's cost per part")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=2048, help="images through the pipeline")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--forward-batches", type=int, default=6)
    parser.add_argument("--rows-per-commit", type=int, default=None, help="samples per committed part (default: the config's)")
    parser.add_argument("--encoder-only", action="store_true", help="only (a) and (c): no Ray, no pipeline")
    parser.add_argument("--pipeline-only", action="store_true", help=argparse.SUPPRESS)  # (b) in a fresh driver process
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)  # (a') in a fresh process
    args = parser.parse_args()
    if args.pipeline_only:
        print(json.dumps(run_pipeline(args)))
        return 0
    if args.forward_only:
        print(json.dumps({"bare_forward_kept": bare_forward(load_encoder(encoder_config(args)), args.batch_size,
                                                            args.forward_batches)}))
        return 0

    encoder = load_encoder(encoder_config(args))
    samples = [jpeg(i) for i in range(min(args.images, 256))]
    figures = {"device": str(encoder.device), "cpus": os.cpu_count(), "model": args.model, "precision": encoder.precision,
               "preprocess": args.preprocess, "batch_size": args.batch_size, "images": args.images,
               "gpu": torch.cuda.get_device_name() if encoder.device.type == "cuda" else None}
    print(f"device {encoder.device} ({figures['gpu'] or 'CPU'}), {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, model {args.model}, precision {encoder.precision}, batch {args.batch_size}, "
          f"preprocess {args.preprocess}, input {encoder.image_size[0]}px from 640x480 JPEGs", flush=True)
    figures["bare_forward"] = bare_forward(encoder, args.batch_size, args.forward_batches)
    print(f"(a) bare encoder forward:          {figures['bare_forward']:10.1f} images/s", flush=True)
    figures.update(child(["--forward-only"], keep_freed_memory_env()))
    print(f"(a') same, freed memory kept:      {figures['bare_forward_kept']:10.1f} images/s "
          "(the encoder actor's allocator settings)", flush=True)
    figures["decode_per_cpu"] = decode_per_cpu(encoder, samples)
    print(f"(c) decode + CPU preprocess / CPU: {figures['decode_per_cpu']:10.1f} images/s", flush=True)
    if not args.encoder_only:
        del encoder  # the pipeline's actor holds its own copy
        figures.update(child(["--pipeline-only"]))
        ratio, strict = (figures["pipeline"] / figures[bare] for bare in ("bare_forward", "bare_forward_kept"))
        print(f"(b) whole pipeline tar -> Parquet:  {figures['pipeline']:10.1f} images/s "
              f"({figures['ray_cpus']} CPUs in Ray, actor start included); ratio (b)/(a) = {ratio:.2f}, "
              f"(b)/(a') = {strict:.2f}")
        print(f"    first part committed after {figures['first_commit_s']:.1f} s (worker and actor start-up); "
              f"after it: {figures['steady']:.1f} images/s, ratio to (a) {figures['steady'] / figures['bare_forward']:.2f}, "
              f"to (a') {figures['steady'] / figures['bare_forward_kept']:.2f}")
        print(f"    driver (its own process): {figures['driver_cpu_share']:.1%} of one CPU while the job ran, "
              f"{figures['driver_cpu_s_per_100k']:.2f} CPU s per 100,000 images at this rate, "
              f"peak RSS {figures['driver_peak_rss_mb']:.0f} MB")
        figures["ratio"], figures["ratio_kept"] = ratio, strict
    if not args.encoder_only and not args.no_driver_cost:
        small = child(["--pipeline-only", "--source", "open_clip", "--model", "litpipe-tiny-vit", "--images", "4096",
                       "--rows-per-commit", "16"])
        at_default = small["driver_ms_per_part"] / 1000 * 100_000 / 4096
        figures["tiny_16_sample_parts"] = {k: round(small[k], 3) for k in ("pipeline", "parts_per_s", "driver_ms_per_part")}
        figures["driver_cpu_s_per_100k_at_4096"] = at_default
        print(f"(d) driver, tiny encoder, 16-sample parts ({small['pipeline']:.0f} images/s, "
              f"{small['parts_per_s']:.1f} parts/s): {small['driver_ms_per_part']:.1f} ms CPU per part, its scheduling "
              f"loop included; at 4,096 samples per part (the default) that is {at_default:.2f} CPU s per 100,000 images")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


def child(flags: list[str], env: dict | None = None) -> dict:
    """The figures a fresh process of this script prints as its last line (`flags` override this run's)."""
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], *flags], stdout=subprocess.PIPE, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def encoder_config(args) -> EncoderConfig:
    if args.source == "hf" and args.model == "dinov2-small":
        args.model = random_dinov2_small()
    return EncoderConfig(source=args.source, model=args.model, precision=args.precision, device=args.device,
                         preprocess=args.preprocess, jpeg_decode=args.jpeg_decode,
                         architecture=DEMO_ARCHITECTURE if args.model == "litpipe-tiny-vit" else None)


def random_dinov2_small() -> str:
    """facebook/dinov2-small's architecture and processor settings, random weights, in a temp folder."""
    import transformers

    folder = Path(tempfile.mkdtemp(prefix="bench-dinov2-small-"))
    transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=384, num_attention_heads=6, num_hidden_layers=12,
                                                       image_size=518, patch_size=14)).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                   do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return str(folder)


def run_pipeline(args) -> dict:
    """(b), in this fresh process as the job's driver: real tar shards in a temp folder -> a fresh
    cache, timed from the job's start (Ray is started before); the driver's CPU time over the same
    span and its peak RSS (the encoder is fingerprinted by a Ray worker, as `litpipe precompute` does)."""
    from litpipe.precompute.job import describe_encoder, precompute
    from litpipe.ray_cluster import init_ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from precompute_samples import sample_members, write_tar

    with tempfile.TemporaryDirectory() as tmp:
        samples = [jpeg(i) for i in range(min(args.images, 256))]
        per_shard = args.images // args.shards
        for s in range(args.shards):
            write_tar(f"{tmp}/bench-{s:06d}.tar", [m for i in range(per_shard)
                                                   for m in sample_members(f"{s}/{i}", samples[(s * per_shard + i) % len(samples)],
                                                                           f"image {i}", ext="jpg")])
        cfg = validate_config({"data": {"train": {"format": "webdataset", "urls": f"{tmp}/bench-*.tar"}},
                               "encoder": encoder_config(args).model_dump(), "store": {"root": f"{tmp}/store"},
                               "precompute": {"batch_size": args.batch_size,
                                              **({"rows_per_commit": args.rows_per_commit} if args.rows_per_commit else {})}})
        ray = init_ray(cfg.ray)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        encoder = describe_encoder(cfg)
        commits = []
        cpu_before, start = time.process_time(), time.perf_counter()
        summary = precompute(cfg, ["train"], encoder,
                             on_commit=lambda s: commits.append((time.perf_counter(), time.process_time(), s.rows)))
        driver_cpu, wall = time.process_time() - cpu_before, time.perf_counter() - start
        images = summary.images
        return {"pipeline": summary.images_per_s, "ray_cpus": cpus, "first_commit_s": commits[0][0] - start,
                "steady": sum(rows for *_, rows in commits[1:]) / (commits[-1][0] - commits[0][0]),
                "driver_ms_per_part": (commits[-1][1] - commits[0][1]) / (len(commits) - 1) * 1000,
                "parts_per_s": (len(commits) - 1) / (commits[-1][0] - commits[0][0]),
                "driver_cpu_share": driver_cpu / wall, "driver_cpu_s_per_100k": driver_cpu / images * 100_000,
                "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


if __name__ == "__main__":
    sys.exit(main())
