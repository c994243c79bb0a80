"""Real image bytes, tar shards and configs for the precompute tests (tiny, deterministic)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from conftest import TINY_ARCHITECTURE

TINY_MODEL = "litpipe-test-tiny-vit"


def image_bytes(seed: int, size=(40, 30), mode="RGB", fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(out, fmt)
    return out.getvalue()


def encode_image(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write_tar(target, members: list[tuple[str, bytes]]) -> None:
    """To a path or an open binary file."""
    opened = tarfile.open(fileobj=target, mode="w") if hasattr(target, "write") else tarfile.open(target, "w")
    with opened as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_members(key: str, image: bytes | None, caption: str | None = None, label: int | None = None,
                   ext: str = "png") -> list[tuple[str, bytes]]:
    """img2dataset's layout: {key}.png + .txt + .json (+ .cls)."""
    members = [] if image is None else [(f"{key}.{ext}", image)]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", b'{"source": "test"}'))
    if label is not None:
        members.append((f"{key}.cls", str(label).encode()))
    return members


def tiny_config(data: dict, root: str, **sections) -> dict:
    return {"data": data, "encoder": {"model": TINY_MODEL, "architecture": TINY_ARCHITECTURE},
            "store": {"root": root}, "precompute": {"batch_size": 8}, **sections}
