"""Which torch device and precision a stage runs on: one rule for the encoder, the trainer and eval;
and how a process that computes on the CPU keeps its memory."""

from __future__ import annotations

import contextlib
import os

import torch

from litpipe.errors import UserError

KEPT_BLOCK_BYTES = 1 << 30  # freed blocks up to this size stay in a CPU process's heap (keep_freed_memory_env)


def resolve_device(choice: str, key: str) -> torch.device:
    """`auto` is the current CUDA GPU when one is visible, else the CPU; `cuda` without a GPU is an
    error naming the config `key` that asked for it."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{key}: cuda requested but no CUDA GPU is visible; set {key} to auto or cpu")
        if choice == "cuda":  # the process's current GPU (Ray sets it per actor and worker)
            choice = f"cuda:{torch.cuda.current_device()}"
    return torch.device(choice)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on CUDA and fp32 on CPU (where bf16 is slow and changes the numbers)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (fp32: none)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def keep_freed_memory_env(environ: dict = os.environ) -> dict[str, str]:
    """Environment for a new process that computes with large buffers (an encoder actor): glibc
    keeps freed blocks up to 1 GiB in its heap (less in threads other than the main one, whose heaps
    glibc caps at 64 MiB), instead of handing each one above its threshold (128 KiB, rising to at
    most 32 MiB) back to the kernel.

    Left at the default, a CPU forward gets its activations from fresh zeroed pages: ViT-B-32 at
    batch 64 faults in about 7 GB per 256 images and spends 13% of its time in the kernel
    (bench/precompute.py). This is what the caching allocator does for CUDA memory. glibc reads
    it at process start, so it reaches Ray workers through their runtime_env; a user's own
    GLIBC_TUNABLES come after it and win."""
    ours = f"glibc.malloc.mmap_threshold={KEPT_BLOCK_BYTES}:glibc.malloc.trim_threshold={KEPT_BLOCK_BYTES}"
    return {"GLIBC_TUNABLES": ":".join(filter(None, [ours, environ.get("GLIBC_TUNABLES")]))}
