"""The GPU runbook: every GPU path of litpipe measured in one command, each part under its own time bound
and printed as soon as it is done, into device.json and device.md named by the machine.

    bash bench/device/run.sh              # on a GPU machine (the device tool): parts bounded to 9 min 20 s in all
    bash bench/device/run.sh --dry-run    # here, on CPU: tiny models, a few images, the same code (a test runs it)
    bash bench/device/run.sh --epoch      # a second call: #40's one training epoch over 10M rows (bounded 8 min)

Parts:
  precompute  ViT-B-32 and ViT-L-14 in bf16 (random init): the bare forward against the whole Ray pipeline
              from tar shards of 640x480 JPEGs to committed Parquet, JPEGs decoded on the GPU and on the CPU
              (bench/precompute.py, each in its own process); goals: >= 0.9 of the bare forward for B-32,
              >= 0.95 for L-14
  parity      the same 256 images embedded on the GPU (bf16, tensor path) and on the CPU (fp32): row cosines
  matmul      the GPU's measured bf16 matmul rate, the denominator of model FLOPs utilisation
  train       a CLIP-B-sized text tower (width 512, 12 layers, 77 tokens) on cached vectors with GradCache:
              samples/s, peak GPU memory and MFU at global batches 16k, 64k, 256k, 1M
  cached      cached against on-the-fly (ViT-B-32 run every step) training samples/s (bench/train.py)
  epoch       (--epoch alone) one epoch of `litpipe train` at a global batch of 65,536, the demo's text tower,
              over a 10M-row cache built there by the store's own commit path (bench/scale.py epoch): data wait
              per step and the trainer's memory, which a 2-core CPU needs 8 hours for
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
TEXT_TOWER = {"width": 512, "layers": 12, "heads": 8, "context_length": 77, "vocab_size": 49408}  # CLIP-B's


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for device.json and device.md (epoch.json and epoch.md with --epoch)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models, a few images: the same code")
    parser.add_argument("--check", action="store_true", help="only say which packages are missing (exit 3 if any)")
    parser.add_argument("--epoch", action="store_true", help="only the training epoch over 10M rows (its own call)")
    args = parser.parse_args()
    missing = missing_packages()
    if missing:
        print("missing on this machine: " + ", ".join(missing) + ". Carry them: run bench/device/wheels.sh where pip "
              "works, then name .whl in the device call's carry (bench/device/run.sh installs them)", file=sys.stderr)
        return 3
    if args.check:
        return 0
    if not args.out:
        parser.error("--out is required")
    gpu = torch.cuda.is_available() and not args.dry_run
    plan = epoch_plan(gpu) if args.epoch else dry_plan() if args.dry_run else gpu_plan()
    results = {"machine": machine(gpu), "dry_run": args.dry_run, "parts": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "epoch" if args.epoch else "device"
    print(f"== litpipe device runbook on {results['machine']}", flush=True)
    for name, bound, part in plan:
        started = time.perf_counter()
        try:
            with time_bound(bound):
                figures = part()
        except Exception as err:  # a part that fails or runs out of time is recorded, the next one runs
            figures = {"error": f"{type(err).__name__}: {err}"[:2000]}
        figures["seconds"] = round(time.perf_counter() - started, 1)
        results["parts"][name] = figures
        print(f"-- {name} ({figures['seconds']} s, bound {bound} s): {json.dumps(figures)}", flush=True)
        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))  # after every part: a later kill keeps it
    (out / f"{stem}.md").write_text(table(results))
    print(table(results))
    return 0 if not any("error" in p for p in results["parts"].values()) else 1


def gpu_plan() -> list:
    return [
        ("precompute ViT-B-32, JPEG decode on GPU", 80, lambda: precompute("ViT-B-32", "device", 4096, 256)),
        ("precompute ViT-B-32, JPEG decode on CPU", 80, lambda: precompute("ViT-B-32", "cpu", 4096, 256)),
        ("precompute ViT-L-14, JPEG decode on GPU", 80, lambda: precompute("ViT-L-14", "device", 4096, 256)),
        ("precompute ViT-L-14, JPEG decode on CPU", 80, lambda: precompute("ViT-L-14", "cpu", 4096, 256)),
        ("parity GPU bf16 vs CPU fp32, 256 images", 60, lambda: parity("ViT-B-32", 256, "cuda")),
        ("matmul bf16", 20, lambda: matmul_rate("cuda", 8192)),
        ("train text tower, GradCache", 100, lambda: train_steps(TEXT_TOWER, [16384, 65536, 262144, 1048576], 1024,
                                                                 "cuda")),
        ("cached vs on the fly, ViT-B-32", 60, lambda: cached_vs_on_the_fly("large (ViT-B-32, 224px)", 2048, 4)),
    ]


def dry_plan() -> list:
    tiny = {"width": 32, "layers": 1, "heads": 2, "context_length": 16, "vocab_size": 49408}
    return [
        # one precompute part: without a GPU, JPEGs are decoded on the CPU either way
        ("precompute tiny, JPEG decode on CPU", 120, lambda: precompute("litpipe-tiny-vit", "cpu", 32, 16)),
        ("parity, 8 images", 60, lambda: parity("litpipe-tiny-vit", 8, "cpu")),
        ("matmul", 20, lambda: matmul_rate("cpu", 256)),
        ("train text tower, GradCache", 60, lambda: train_steps(tiny, [64, 128], 32, "cpu")),
        ("cached vs on the fly", 120, lambda: cached_vs_on_the_fly("small (litpipe-tiny-vit, 64px)", 16, 2)),
    ]


def epoch_plan(gpu: bool) -> list:
    if gpu:
        return [("one epoch over 10M rows, demo tower at 65,536", 480, lambda: epoch(10_000_000, 65_536, True))]
    return [("one epoch over 10,000 rows, demo tower at 2,048", 200, lambda: epoch(10_000, 2_048, False))]


def missing_packages() -> list[str]:
    missing = []
    for module in ("litpipe", "open_clip", "ray", "ray.data", "pydantic", "braceexpand"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return missing


def machine(gpu: bool) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = torch.cuda.get_device_name() if gpu else "no GPU"
    return f"{name}, {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}"


@contextmanager
def time_bound(seconds: int):
    """Raise TimeoutError in this process after `seconds` (a part's subprocesses have their own timeouts)."""
    def expire(*_):
        raise TimeoutError(f"over its bound of {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def precompute(model: str, jpeg_decode: str, images: int, batch: int) -> dict:
    """bench/precompute.py in its own process: bare forward against the whole pipeline, bf16 on a GPU."""
    command = [sys.executable, str(ROOT / "bench" / "precompute.py"), "--model", model, "--images", str(images),
               "--batch-size", str(batch), "--jpeg-decode", jpeg_decode, "--no-driver-cost", "--forward-batches", "4",
               "--precision", "bf16" if torch.cuda.is_available() else "fp32"]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    keep = ("bare_forward", "bare_forward_kept", "pipeline", "steady", "ratio", "ratio_kept", "first_commit_s",
            "decode_per_cpu", "precision")
    return {k: figures[k] for k in keep if k in figures}


def parity(model: str, count: int, device: str) -> dict:
    """The same JPEGs embedded on `device` in bf16 (tensor path) and on the CPU in fp32 (pil path): row cosines."""
    from precompute import DEMO_ARCHITECTURE, jpeg

    from litpipe.config import EncoderConfig
    from litpipe.models.image_encoder import load_encoder
    from litpipe.images import decode_image

    architecture = DEMO_ARCHITECTURE if model == "litpipe-tiny-vit" else None
    samples = [decode_image(jpeg(i), 89_478_485) for i in range(count)]
    features = {}
    for name, dev, precision, preprocess in (("device", device, "bf16", "tensor"), ("cpu", "cpu", "fp32", "pil")):
        encoder = load_encoder(EncoderConfig(model=model, architecture=architecture, precision=precision,
                                             preprocess=preprocess), device=dev)
        features[name] = torch.cat([encoder.embed_pixels([encoder.pixels.cpu_step.cpu(s) for s in samples[a:a + 64]])
                                    for a in range(0, count, 64)])
    cosines = torch.nn.functional.cosine_similarity(features["device"].double(), features["cpu"].double(), dim=-1)
    return {"images": count, "cosine_min": round(float(cosines.min()), 6), "cosine_mean": round(float(cosines.mean()), 6),
            "goal_met": bool(cosines.min() >= 0.999)}


def matmul_rate(device: str, n: int) -> dict:
    """TFLOP/s of a bf16 (GPU) or fp32 (CPU) n x n matmul, the best of 10 after a warm-up."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(11):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return {"n": n, "dtype": str(dtype), "tflops": round(2 * n**3 / best / 1e12, 2)}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(tower_cfg: dict, batches: list[int], chunk: int, device: str) -> dict:
    """One GradCache step of the text tower at each global batch (after a warm-up step): samples/s, peak memory
    and model FLOPs utilisation against the measured matmul rate (tower: 8 x params x tokens, forward, the
    GradCache re-forward and backward; loss: the chunked M x B products in float32)."""
    from litpipe.models.text_tower import TextTower
    from litpipe.train_text.grad_cache import grad_cached_backward
    from litpipe.train_text.loss import global_contrastive_loss

    rate = matmul_rate(device, 8192 if device == "cuda" else 256)["tflops"] * 1e12
    torch.manual_seed(0)
    tower = TextTower(tower_cfg, 512).to(device)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-4)
    params = sum(p.numel() for name, p in tower.named_parameters() if "token_embedding" not in name)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def embed(tokens):
        with autocast:
            return tower(tokens).float()

    def step(batch: int) -> float:
        tokens = torch.randint(1, tower_cfg["vocab_size"] - 2, (batch, tower_cfg["context_length"]), device=device,
                               dtype=torch.int32)  # as the trainer's ids
        tokens[:, -1] = tower_cfg["vocab_size"] - 1
        images = torch.randn(batch, 512, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        grad_cached_backward(embed, tokens, chunk, lambda f: global_contrastive_loss(
            f, images, tower.logit_scale, tower.logit_bias, "softmax", chunk))
        optimizer.step()
        sync(device)
        return time.perf_counter() - start

    step(batches[0])  # warm-up: kernels, allocator
    rows = {}
    for batch in batches:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = step(batch)
        flops = 8 * params * batch * tower_cfg["context_length"] + 6 * batch * batch * 512
        rows[str(batch)] = {"samples_per_s": round(batch / seconds, 1), "step_s": round(seconds, 2),
                            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                            "mfu": round(flops / seconds / rate, 3)}
    return {"tower": tower_cfg, "chunk": chunk, "matmul_tflops": round(rate / 1e12, 1), "batches": rows}


def cached_vs_on_the_fly(tower_name: str, batch: int, steps: int) -> dict:
    """bench/train.py's (a) cached against (b) on-the-fly training, same text tower and batches."""
    from train import IMAGE_TOWERS, throughput

    cached, on_the_fly = throughput(tower_name, IMAGE_TOWERS[tower_name], batch, steps)
    return {"batch": batch, "cached": round(cached, 1), "on_the_fly": round(on_the_fly, 1),
            "ratio": round(cached / on_the_fly, 2)}


def epoch(rows: int, batch: int, gpu: bool) -> dict:
    """bench/scale.py epoch in its own process: the cache's build seconds, then train's rusage, steps, data
    wait (first step, and the median of the rest) and samples/s."""
    command = [sys.executable, str(ROOT / "bench" / "scale.py"), "epoch", "--rows", str(rows), "--batch", str(batch),
               *(["--gpu"] if gpu else [])]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = [f"# litpipe device runbook: {results['machine']}" + (" (dry run)" if results["dry_run"] else ""), "",
             "| part | s | figures |", "| --- | ---: | --- |"]
    for name, figures in results["parts"].items():
        shown = {k: v for k, v in figures.items() if k != "seconds"}
        lines.append(f"| {name} | {figures['seconds']} | {json.dumps(shown)[:600]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
