"""Which torch device and precision a stage runs on: one rule for the encoder, the trainer and eval."""

from __future__ import annotations

import contextlib

import torch

from litpipe.errors import UserError


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
