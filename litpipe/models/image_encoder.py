"""The locked image tower: one definition for precompute, export and on-the-fly references.

Everything that decides what a cached embedding means lives here: the source library and model, its
weights, its library's own eval transform (never a re-implementation; `image_towers.py` builds each),
the stored output, normalisation and precision. `fingerprint` names all of it, so a cache is reused
only by an identical encoder.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from litpipe.config import EncoderConfig
from litpipe.devices import autocast, resolve_device, resolve_precision
from litpipe.models.image_towers import build_tower
from litpipe.models.pixels import PixelSteps


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict tensor in name order.

    Hashing tensors, not files, gives one answer for tags, checkpoint paths, hf-hub ids and seeded
    random init alike.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class EncoderDescription:
    """What a driver needs of the locked tower without holding it: the fingerprint that names its
    caches and the CPU pixel step its read tasks run (`Encoder.describe`)."""

    fingerprint: dict
    cpu_step: Any  # a CpuPixels

    @property
    def dim(self) -> int:
        return self.fingerprint["dim"]


@dataclass
class Encoder:
    """A frozen, eval-mode image model with its eval transform; `encode` gives float32 embeddings."""

    model: torch.nn.Module  # an open_clip CLIP (its `.visual` is the tower), a timm or a transformers model
    forward: Any  # normalised pixels -> the configured output (`Tower.forward`)
    preprocess: Any
    preprocess_cfg: dict
    device: torch.device
    precision: str
    normalize: bool
    pixels: PixelSteps  # the configured preprocessing path: CPU step in decode workers, device step here
    fingerprint: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.fingerprint["dim"]

    def describe(self) -> EncoderDescription:
        return EncoderDescription(self.fingerprint, self.pixels.cpu_step)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pixels.size

    @torch.inference_mode()
    def embed_pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images from `pixels.cpu_step` -> float32 embeddings [B, dim] on the CPU."""
        return self.encode(self.pixels.to_device(images, self.device))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocessed images [B, 3, H, W] (on any device) -> float32 embeddings [B, dim] on the CPU."""
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.device != self.device:
            images = (images.pin_memory() if self.device.type == "cuda" else images).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device):
            features = self.forward(images)
        features = features.float()
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu()


def load_encoder(encoder_cfg: EncoderConfig, device: str | torch.device | None = None) -> Encoder:
    """Build the locked image tower of `encoder_cfg` on `device` (default: encoder.device)."""
    device = torch.device(device) if device is not None else resolve_device(encoder_cfg.device, "encoder.device")
    if not encoder_cfg.pretrained and encoder_cfg.source != "hf":  # an hf model's weights are its folder's
        choices = "`timm` or a checkpoint path" if encoder_cfg.source == "timm" else "a tag, checkpoint path or hf-hub: id"
        print(f"\n!!! litpipe: encoder `{encoder_cfg.model}` has NO pretrained weights: random init "
              f"(seed {encoder_cfg.seed}). Fine for tests and the demo, meaningless otherwise; "
              f"set encoder.pretrained to {choices}. !!!\n", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder_cfg.seed)  # random init: the same weights in every process
        tower = build_tower(encoder_cfg)
    model = tower.module
    sha = weights_sha256(model.visual if encoder_cfg.source == "open_clip" else model)
    model.eval().requires_grad_(False)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    encoder = Encoder(model, tower.forward, tower.transform, tower.preprocess_cfg, device,
                      resolve_precision(encoder_cfg.precision, device), encoder_cfg.normalize,
                      PixelSteps(tower.transform, tower.preprocess_cfg, encoder_cfg.preprocess, encoder_cfg.jpeg_draft))
    pp = tower.preprocess_cfg
    size = encoder.image_size
    dim = encoder.encode(torch.zeros(1, 3, *size)).shape[1]
    spec = encoder_cfg.spec()  # a local checkpoint or model folder named by its bytes, not its path
    encoder.fingerprint = {
        "source": encoder_cfg.source,
        "model": spec["model"],
        "pretrained": spec["pretrained"],
        "weights_sha256": sha,
        "output": encoder_cfg.output,
        "normalize": encoder_cfg.normalize,
        # The configured precision, not the resolved one: the cache of an `auto` encoder made on GPUs is
        # found again from a CPU-only trainer. The resolved one is `Encoder.precision`.
        "precision": encoder_cfg.precision,
        "dim": int(dim),
        "preprocess": {
            "image_size": list(size),
            "mean": [float(m) for m in pp["mean"]],
            "std": [float(s) for s in pp["std"]],
            "interpolation": pp["interpolation"],
            "resize_mode": pp["resize_mode"],
            "resize_to": pp["resize_to"],
            "pixels": encoder.pixels.describe(),
            "transform": repr(tower.transform),
        },
        "spec": spec,
    }
    return encoder
