"""Text-tower training: cached vs on-the-fly locked-image throughput, and peak memory vs global batch.

    .venv/bin/python bench/train.py                        # CPU defaults (a few minutes on 2 cores)
    .venv/bin/python bench/train.py --batch 1024 --steps 10 --memory-batches 1024 4096 16384 65536   # GPU
    .venv/bin/python bench/train.py --heads                # head-only training on both caches

(a) cached: the trainer reads image embeddings from a real cache (store API);
(b) on the fly: the same trainer, text tower and batches, but the locked image tower embeds each
    batch's images every step (open_clip's --lock-image); both in this one run, printed as a ratio.
Memory: one training step (GradCache on / off) at each global batch, each in a fresh process,
peak RSS (CPU) or peak CUDA memory (GPU) above the process's footprint before the step.
--heads: (c) head-only training reading both caches (image vectors, a frozen text model's features) against
(d) LL with the frozen text model run every step, same heads, batch and steps, in one run; then the peak
memory of one head-only step at each of --heads-memory-batches.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from litpipe.store.commits import commit_part, finalize
from litpipe.config import validate_config
from litpipe.store import EmbeddingCache
from litpipe.models.image_encoder import load_encoder
from litpipe.store.fingerprint import dataset_fingerprint

TOWER = {"width": 128, "layers": 2, "heads": 4, "context_length": 32}
IMAGE_TOWERS = {
    "small (litpipe-tiny-vit, 64px)": {
        "model": "litpipe-tiny-vit",
        "architecture": {"embed_dim": 128,
                         "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 64, "patch_size": 8},
                         "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}},
    },
    "large (ViT-B-32, 224px)": {"model": "ViT-B-32"},
}


def pipeline(tmp: Path, encoder: dict, batch: int, steps: int) -> dict:
    return {
        "workdir": str(tmp / "run"),
        "data": {"train": {"format": "webdataset", "urls": str(tmp / "inputs" / "part-0.tar")}},
        "encoder": {**encoder, "precision": "auto"},
        "store": {"root": str(tmp / "store")},
        "train": {"tower": TOWER, "batch_size": batch, "chunk_size": min(batch, 256), "steps": steps, "log_every": steps},
    }


def throughput(name: str, encoder_spec: dict, batch: int, steps: int) -> tuple[float, float]:
    """samples/s of (a) cached and (b) on-the-fly training on the same synthetic images."""
    from litpipe.train_text.trainer import build_run, fit, train

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "inputs").mkdir()
        (tmp / "inputs" / "part-0.tar").write_bytes(b"synthetic")
        cfg = validate_config(pipeline(tmp, encoder_spec, batch, steps))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        encoder = load_encoder(cfg.encoder, device=device)
        rows = batch * steps
        images = torch.rand(rows, 3, *encoder.image_size, generator=torch.Generator().manual_seed(0))
        keys = [f"k{i:06d}" for i in range(rows)]
        by_key = dict(zip(keys, images))
        embeddings = torch.cat([encoder.encode(images[i : i + 256]) for i in range(0, rows, 256)]).numpy()
        cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fingerprint(cfg.data["train"]))
        captions = [[f"synthetic image number {i}", f"picture {i % 97}"] for i in range(rows)]
        commit_part(cache, str(tmp / "inputs" / "part-0.tar"), pa.table({
            "key": keys, "captions": captions,
            "embedding": pa.FixedSizeListArray.from_arrays(embeddings.reshape(-1), embeddings.shape[1])}))
        finalize(cache)
        cached = train(cfg).samples_per_s
        run = build_run(cfg)
        run.image_features = lambda b: encoder.encode(torch.stack([by_key[k] for k in b.keys]))
        on_the_fly = fit(cfg, run).samples_per_s
    print(f"{name}: (a) cached {cached:,.0f} samples/s, (b) on the fly {on_the_fly:,.0f} samples/s, "
          f"speedup (a)/(b) = {cached / on_the_fly:.1f}x", flush=True)
    return cached, on_the_fly


def peak_memory(step, device: str) -> dict:
    """Run `step()` once: its seconds and the peak memory above the process's footprint before it (peak CUDA
    memory on a GPU, peak RSS on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"extra_mb": (peak - before) / 2**20, "seconds": time.perf_counter() - start}


def _step_memory(batch: int, grad_cache: bool, chunk: int, dim: int, queue) -> None:
    """One optimiser step at global batch `batch` (image dim `dim`) in this (fresh) process; report peak memory
    above the start. Token ids are int32 on the CPU and reach the device a chunk at a time, as in the trainer."""
    from litpipe.models.text_tower import TextTower
    from litpipe.train_text.grad_cache import full_backward, grad_cached_backward
    from litpipe.train_text.loss import global_contrastive_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tower = TextTower({**TOWER, "vocab_size": 49408}, dim).to(device)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-3)
    tokens = torch.randint(1, 49406, (batch, TOWER["context_length"]), dtype=torch.int32)
    tokens[:, -1] = 49407
    images = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=-1)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def embed(t):
        with autocast:
            return tower(t.to(device)).float()

    def loss_fn(f):
        return global_contrastive_loss(f, images, tower.logit_scale, tower.logit_bias, "softmax", chunk)

    def step():
        if grad_cache:
            grad_cached_backward(embed, tokens, chunk, loss_fn)
        else:
            full_backward(embed, tokens, loss_fn)
        optimizer.step()

    queue.put(peak_memory(step, device))


TEXT_MODEL = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}  # BERT-base
HEADS = {"text": {"kind": "mlp", "depth": 4, "width": 1024}, "image": {"kind": "none"}}  # ShareLock's shape


def _save_text_model(folder: Path) -> None:
    """A random BERT of TEXT_MODEL's size with a word-level vocabulary of the synthetic captions' words."""
    import transformers

    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "synthetic", "image", "number", "picture",
             *[str(i) for i in range(1000)]]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(words), max_position_embeddings=64,
                                                   **TEXT_MODEL)).save_pretrained(folder)


def heads_throughput(batch: int, steps: int) -> tuple[float, float]:
    """samples/s of (c) head-only training on both caches and (d) the same heads with the text model run live."""
    from litpipe.models.text_model import FrozenTextModel
    from litpipe.train_text.trainer import build_run, fit

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "inputs").mkdir()
        (tmp / "inputs" / "part-0.tar").write_bytes(b"synthetic")
        _save_text_model(tmp / "bert")
        raw = pipeline(tmp, IMAGE_TOWERS["small (litpipe-tiny-vit, 64px)"], batch, steps)
        raw["train"].update(text_model={"model": str(tmp / "bert"), "pooling": "mean", "max_length": 32}, heads=HEADS)
        raw["ray"] = {"num_cpus": 2}
        cfg = validate_config(raw)
        rows = batch * steps
        embeddings = np.random.default_rng(0).standard_normal((rows, 128), dtype=np.float32)
        encoder = load_encoder(cfg.encoder, device="cpu")
        cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fingerprint(cfg.data["train"]))
        words = np.random.default_rng(1).integers(0, 1000, (rows, 2, 16))  # 16-word captions, about CC3M's mean
        captions = [[" ".join(f"{w}" for w in caption) for caption in image] for image in words]
        commit_part(cache, str(tmp / "inputs" / "part-0.tar"), pa.table({
            "key": [f"k{i:07d}" for i in range(rows)], "captions": captions,
            "embedding": pa.FixedSizeListArray.from_arrays(embeddings.reshape(-1), embeddings.shape[1])}))
        finalize(cache)
        started = time.perf_counter()
        run = build_run(cfg)  # builds the text-feature cache: the text model's one pass over every caption
        built = time.perf_counter() - started
        cached = fit(cfg, run).samples_per_s
        live_run = build_run(cfg)
        live_run.per_caption = None
        live_run.encode_captions = FrozenTextModel(cfg.train.text_model).encode
        live = fit(cfg, live_run).samples_per_s
    print(f"text-feature cache: {2 * rows:,} captions in {built:.1f} s (Ray start and the model's load included)")
    print(f"head-only: (c) both caches {cached:,.0f} samples/s, (d) text model live (LL) {live:,.0f} samples/s, "
          f"speedup (c)/(d) = {cached / live:.1f}x", flush=True)
    return cached, live


def _heads_step_memory(batch: int, chunk: int, queue) -> None:
    """One head-only optimiser step at global batch `batch` (float16 text features, 512-d, into 512-d image
    vectors, GradCache over the text head) in this fresh process; peak memory above the start."""
    from litpipe.config import HeadsConfig
    from litpipe.models.heads import Heads
    from litpipe.train_text.grad_cache import grad_cached_backward
    from litpipe.train_text.loss import global_contrastive_loss

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    heads = Heads(HeadsConfig(**HEADS), 512, 512).to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=1e-3)
    features = torch.randn(batch, 512, device=device).half()
    images = torch.randn(batch, 512, device=device).half()  # as read from a float16 cache
    def step():
        grad_cached_backward(heads, features, chunk, lambda f: global_contrastive_loss(
            f, images.float(), heads.logit_scale, heads.logit_bias, "softmax", chunk))
        optimizer.step()

    queue.put(peak_memory(step, device))


def in_fresh_process(target, *args) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    # glibc serves a block of 1 MiB or more by mmap and unmaps it when freed, at a fixed threshold (by default it
    # rises after frees and keeps freed tensors in the heap): peak RSS then follows the tensors alive at once
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    try:
        process.start()
    finally:
        if threshold is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = threshold
    process.join()
    return queue.get() if process.exitcode == 0 else {"extra_mb": float("nan"), "seconds": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="global batch for the throughput runs")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--memory-batches", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--no-cache-max", type=int, default=4096,
                        help="largest batch tried without GradCache (its activations grow with the batch)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--image-dim", type=int, default=512, help="embedding width of the memory runs")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--heads", action="store_true", help="head-only training on both caches instead")
    parser.add_argument("--heads-memory-batches", type=int, nargs="*", default=[16384, 32768, 65536])
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    if args.heads:
        print(f"device: {device}; text model BERT {TEXT_MODEL}, heads {HEADS}")
        heads_throughput(args.batch, args.steps)
        print(f"== peak memory of one head-only step above the process's start (chunk {args.chunk}), 512-d both sides")
        for batch in args.heads_memory_batches:
            step = in_fresh_process(_heads_step_memory, batch, args.chunk)
            print(f"{batch:>12} | {step['extra_mb']:>10,.0f} MB | {step['seconds']:>7.1f} s", flush=True)
        return
    print(f"device: {device}; text tower {TOWER}")
    if not args.skip_throughput:
        print(f"== throughput: global batch {args.batch}, {args.steps} steps")
        for name, spec in IMAGE_TOWERS.items():
            throughput(name, spec, args.batch, args.steps)
    print(f"== peak memory of one step above the process's start (chunk {args.chunk}), image dim {args.image_dim}")
    print(f"{'global batch':>12} | {'GradCache MB':>12} | {'s':>6} | {'no GradCache MB':>15} | {'s':>6}")
    for batch in args.memory_batches:
        cached = in_fresh_process(_step_memory, batch, True, args.chunk, args.image_dim)
        full = in_fresh_process(_step_memory, batch, False, args.chunk, args.image_dim) if batch <= args.no_cache_max else {"extra_mb": np.nan, "seconds": np.nan}
        print(f"{batch:>12} | {cached['extra_mb']:>12,.0f} | {cached['seconds']:>6.1f} | "
              f"{full['extra_mb']:>15,.0f} | {full['seconds']:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
