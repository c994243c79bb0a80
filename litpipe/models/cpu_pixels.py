"""The CPU step of image preprocessing, as read tasks run it: no torch, so they start fast.

On `pil` it is open_clip's PIL transform up to ToTensor (those steps are torchvision objects, so
only that path imports torchvision here); on `tensor` an integer box reduction of huge images
that keeps the shorter side at least REDUCE_MARGIN times the input size, to bound the bytes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

REDUCE_MARGIN = 2  # the tensor path's CPU shrink keeps the shorter side >= 2x the input size


def draft_side(mode: str, size: tuple[int, int], resize_to: int) -> int:
    """The shorter side libjpeg's draft must keep (`encoder.jpeg_draft`): what the resize keeps on
    `pil` (`resize_to`, the shorter side before the crop), REDUCE_MARGIN x the input size on `tensor`."""
    return resize_to if mode == "pil" else REDUCE_MARGIN * min(size)


class CpuPixels:
    """An RGB image -> uint8 [H, W, 3]: final size on `pil`, bounded size on `tensor`. With `draft_to`,
    JPEGs are decoded by `decode_image` at the largest DCT scale that keeps both sides >= it."""

    def __init__(self, mode: str, size: tuple[int, int], pil_steps: list, draft_to: int | None = None):
        self.mode, self.size, self.pil_steps, self.draft_to = mode, size, pil_steps, draft_to

    def cpu(self, image: Image.Image) -> np.ndarray:
        if self.mode == "pil":
            for step in self.pil_steps:
                image = step(image)
            return np.asarray(image.convert("RGB"))
        factor = self.reduction(*image.size)
        return np.asarray(image.reduce(factor) if factor > 1 else image)

    def reduction(self, width: int, height: int) -> int:
        """The tensor path's integer shrink of a width x height image (1: none)."""
        return max(1, min(width, height) // (REDUCE_MARGIN * min(self.size)))

    def held_bytes(self, width: int, height: int) -> int:
        """Bytes of what `cpu` makes of a width x height image, known from its header: read tasks cut
        their parts by it before decoding anything."""
        if self.mode == "pil":
            return 3 * self.size[0] * self.size[1]
        factor = self.reduction(width, height)
        return 3 * -(-width // factor) * -(-height // factor)  # Image.reduce rounds up
