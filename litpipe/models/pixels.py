"""Image preprocessing split where it is cheapest: the CPU that decodes, the device that encodes.

Pixels cross between them as uint8 (a quarter of float32's bytes). Two paths, chosen by
`encoder.preprocess` and part of the encoder fingerprint, so their caches never mix:

- `pil`: open_clip's own eval transform up to `ToTensor` (its Resize, CenterCrop, ...) runs on
  the CPU; the device does ToTensor's /255 and Normalize with the same float32 operations, so
  the result equals open_clip's transform exactly.
- `tensor`: the CPU only decodes (and shrinks huge images by an integer box reduction that keeps
  the shorter side at least twice the input size, to bound the bytes); the device resizes
  (shortest side, antialiased, the model's interpolation), centre-crops and normalises. It is
  not open_clip's PIL arithmetic: the difference is measured in tests/test_pixels.py and
  docs/benchmarks.md. open_clip's `longest` resize mode (pad to square) exists only on `pil`.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from litpipe.errors import UserError
from litpipe.models.cpu_pixels import REDUCE_MARGIN, CpuPixels, draft_side

VERSION = 1  # bump when the arithmetic of either path changes: it is in the encoder fingerprint


class PixelSteps:
    """The CPU step (`cpu_step`, sent to the read tasks) and device step (`to_device`, in the encoder) of one path."""

    def __init__(self, transform, preprocess_cfg: dict, mode: str, jpeg_draft: bool = False):
        steps = list(transform.transforms)
        cut = next(i for i, step in enumerate(steps) if "ToTensor" in type(step).__name__)
        pil_steps, normalize = steps[:cut], steps[-1]
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32).clone().view(1, 3, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32).clone().view(1, 3, 1, 1)
        size = preprocess_cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.interpolation = (InterpolationMode.BILINEAR if preprocess_cfg["interpolation"] == "bilinear"
                              else InterpolationMode.BICUBIC)
        self.resize_mode = preprocess_cfg["resize_mode"]
        self.resize_to = preprocess_cfg.get("resize_to") or self.size[0]  # the shorter side before the crop
        # Where an odd margin puts the centre crop: torchvision rounds half to even (open_clip's and timm's
        # CenterCrop), transformers floors (a Hugging Face processor's center_crop): one pixel apart.
        self.crop = preprocess_cfg.get("crop", "round")
        if mode == "tensor" and self.resize_mode not in ("shortest", "squash"):
            raise UserError(f"encoder.preprocess: tensor cannot do the `{self.resize_mode}` resize mode (open_clip's "
                            "`longest` pads to square; timm's non-centre crops); set encoder.preprocess: pil")
        self.mode = mode
        self.cpu_step = CpuPixels(mode, self.size, pil_steps if mode == "pil" else [],
                                  draft_to=draft_side(mode, self.size, self.resize_to) if jpeg_draft else None)

    def describe(self) -> dict:
        """What decides the pixels this path makes, for the encoder fingerprint."""
        tensor = {"reduce_margin": REDUCE_MARGIN, **({"crop": self.crop} if self.crop != "round" else {})}
        draft = {"jpeg_draft_to": self.cpu_step.draft_to} if self.cpu_step.draft_to else {}
        return {"path": self.mode, "version": VERSION, **(tensor if self.mode == "tensor" else {}), **draft}

    def to_device(self, images: list, device: torch.device) -> torch.Tensor:
        """The encoder's float32 input [B, 3, *size] on `device`, in input order, from uint8 images:
        [H, W, 3] numpy arrays from `cpu_step`, or [3, H, W] tensors already decoded on the device
        (sizes may differ on `tensor`)."""
        out = torch.empty((len(images), 3, *self.size), dtype=torch.float32, device=device)
        by_shape: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault((type(image), tuple(image.shape)), []).append(i)
        for (kind, _), rows in by_shape.items():  # one batched op per distinct input size
            if kind is torch.Tensor:
                batch = torch.stack([images[i] for i in rows]).to(device)
            else:
                batch = torch.from_numpy(np.stack([images[i] for i in rows])).permute(0, 3, 1, 2)
                batch = (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)
            if self.mode == "tensor":
                batch = self.resize_and_crop(batch)
            out[torch.tensor(rows, device=device)] = self.normalize(batch)
        return out

    def resize_and_crop(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, h, w] -> uint8 [n, 3, *size]: the `shortest` (shorter side to `resize_to`, then a centre
        crop: open_clip's, timm's with its crop_pct, a Hugging Face processor's) or `squash` eval geometry."""
        if self.resize_mode == "squash":
            return TF.resize(batch, list(self.size), interpolation=self.interpolation, antialias=True)
        if self.size[0] == self.size[1]:  # torchvision's shorter-edge rule, as open_clip's and timm's Resize(int) use
            target = [self.resize_to]
        else:
            height, width = batch.shape[-2:]
            scale = max(self.size[0] / height, self.size[1] / width)
            target = [max(self.size[0], round(height * scale)), max(self.size[1], round(width * scale))]
        resized = TF.resize(batch, target, interpolation=self.interpolation, antialias=True)
        if self.crop == "floor":
            top, left = (resized.shape[-2] - self.size[0]) // 2, (resized.shape[-1] - self.size[1]) // 2
            return resized[..., top:top + self.size[0], left:left + self.size[1]]
        return TF.center_crop(resized, list(self.size))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 -> ToTensor's /255, then Normalize: the same float32 operations as torchvision's."""
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return batch.float().div(255).sub(mean).div(std)
