"""One part of an input shard decoded for the encoder: uint8 pixels, keys, captions, and a reason per bad image.

Each image goes through `litpipe.images.decode_image` (EXIF orientation, transparency on white,
16-bit and CMYK converted as they look); failures are returned as reasons, not raised, so a bad
image is recorded and skipped without failing its batch.

No torch here: read tasks import only this, and start in a second instead of five.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field

import numpy as np

from litpipe.images import DecodeError, decode_image, open_bounded


@dataclass
class Part:
    """One part of an input shard, from its read task to its commit: the good samples' columns, in
    input order, and the bad ones' errors.

    `pixels` holds what the encoder still has to finish: uint8 [H, W, 3] arrays decoded on the CPU,
    uint8 [n] JPEG bytes that travelled encoded (`device_decode.finish_decoding` turns them into
    tensors on the encoder's device), then nothing once embedded.
    """

    keys: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    metadata: list[str | None] = field(default_factory=list)  # JSON objects
    pixels: list = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # {"key", "reason"}
    legacy_captions: int = 0  # samples whose caption bytes were not UTF-8 (read as cp1252/Latin-1)
    decoded_by: str = ""  # host:pid of the process that decoded it

    SAMPLE_COLUMNS = ("keys", "captions", "labels", "metadata", "pixels")

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, start: int, stop: int) -> Part:
        """Samples [start, stop), without errors."""
        return Part(**{column: getattr(self, column)[start:stop] for column in self.SAMPLE_COLUMNS})

    def without(self, dropped: set[int]) -> Part:
        """The part less the samples at `dropped` (their errors are the caller's to add)."""
        return Part(**{column: [v for i, v in enumerate(getattr(self, column)) if i not in dropped]
                       for column in self.SAMPLE_COLUMNS}, errors=self.errors, legacy_captions=self.legacy_captions,
                    decoded_by=self.decoded_by)

    def extend(self, other: Part) -> None:
        for column in (*self.SAMPLE_COLUMNS, "errors"):
            getattr(self, column).extend(getattr(other, column))
        self.legacy_captions += other.legacy_captions


def decode_part(samples: list, pixels, max_pixels: int, jpeg_on_device: bool = False) -> Part:
    """One part of an input shard, ready for the encoder: the good samples' uint8 pixels (what
    `pixels.cpu` (a `CpuPixels`) makes of them on this CPU) with their text, and a reason per bad one.

    Pixels travel as uint8, a quarter of float32's bytes; the encoder finishes them on its device.
    With `jpeg_on_device`, JPEGs the device can decode travel still encoded (smaller yet) and are
    decoded by `device_decode.finish_decoding` in the encoder.
    """
    part = Part(decoded_by=f"{socket.gethostname()}:{os.getpid()}")
    for sample in samples:
        error = sample.error
        if error is None:
            try:
                encoded = device_jpeg(sample.image, max_pixels) if jpeg_on_device else None
                part.pixels.append(encoded if encoded is not None else pixels.cpu(decode_image(sample.image, max_pixels, pixels.draft_to)))
            except DecodeError as err:
                error = stable_reason(str(err))
        if error is not None:
            part.errors.append({"key": sample.key, "reason": error})
            continue
        part.keys.append(sample.key)
        part.captions.append(sample.captions)
        part.labels.append(sample.label)
        part.metadata.append(None if sample.metadata is None else json.dumps(sample.metadata, sort_keys=True, default=str))
        part.legacy_captions += sample.legacy_text
    return part


def device_jpeg(data: bytes | None, max_pixels: int) -> np.ndarray | None:
    """A JPEG's bytes as uint8 [n], when a device decoder can take it (colour or grey, within
    `max_pixels`: only the header is read here); None for anything else (PNG, CMYK, ...), which the
    CPU decodes. A bomb is refused here, with the CPU path's reason."""
    if not data or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        mode = open_bounded(data, max_pixels).mode
    except DecodeError:
        raise
    except Exception:  # a broken header: the CPU path names the reason
        return None
    return np.frombuffer(data, np.uint8).copy() if mode in ("RGB", "L") else None


def stable_reason(reason: str) -> str:
    """Drop object addresses from library messages, so reruns record identical reasons."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", reason)
