"""JPEGs that travelled encoded -> uint8 tensors on the encoder's device (nvjpeg on a GPU), the
CPU path taking over for what the device decoder refuses."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from litpipe.images import DecodeError, decode_image

from .decode import Part, stable_reason


def finish_decoding(part: Part, pixels, device: torch.device, max_pixels: int) -> Part:
    """Decode the part's JPEGs that travelled encoded, in one batch on `device` (nvjpeg on a GPU).

    An image the device decoder refuses goes through the CPU path, and is recorded with that
    path's reason if it fails there too: the same records as a CPU-decoded run.
    """
    encoded = [i for i, p in enumerate(part.pixels) if isinstance(p, np.ndarray) and p.ndim == 1]
    if not encoded:
        return part
    tensors = [torch.from_numpy(part.pixels[i]) for i in encoded]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad image fails the batch: find it one by one
        images = [_decode_one(t, device) for t in tensors]
    failed = set()
    for i, image in zip(encoded, images):
        if image is not None:
            part.pixels[i] = image
            continue
        try:
            part.pixels[i] = pixels.cpu(decode_image(part.pixels[i].tobytes(), max_pixels, pixels.draft_to))
        except DecodeError as err:
            failed.add(i)
            part.errors.append({"key": part.keys[i], "reason": stable_reason(str(err))})
    return part.without(failed) if failed else part


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        return None
