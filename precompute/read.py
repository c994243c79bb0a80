"""Read tasks: an input shard, streamed -> its parts, decoded to uint8 on the CPU and pickled for the encoder.

This module and what it imports stay free of torch, so a read worker starts in about a second
while the encoder actor beside it imports torch and open_clip.
"""

from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pyarrow as pa

from litpipe.config import DatasetConfig
from litpipe.images import open_header
from litpipe.models.cpu_pixels import CpuPixels
from litpipe.sources import SHARD_ERROR_KEY, Sample, TransientReadError, iter_shard

from .decode import decode_part

RETRY_BACKOFF_S = 1.0  # the first retry of a shard waits this long, each later one twice as long


def read_parts(batch: pa.Table, datasets: dict[str, DatasetConfig], rows_per_commit: dict[str, int | None],
               pixels: CpuPixels, max_pixels: int, jpeg_on_device: bool, yield_cpu: bool, read_retries: int,
               part_bytes: dict[str, int | None] | None = None):
    """One input shard (a batch of one row, naming its dataset) -> one table per part not yet
    committed: a row holding its decoded `Part` (`part_row`).

    Parts are cut in input order (`cut_parts`): `rows_per_commit` samples, or fewer where the
    next sample would take the part's bytes (`sample_bytes`) past the dataset's `part_bytes`. The
    rule reads image headers, never pixels, and depends only on what the cache fixes (the bound,
    the encoder's pixel path), so every run cuts the same parts and a resumed task skips committed
    ones without decoding them; an empty shard is one part holding one error.
    Samples stream from the shard, so a task holds one part (plus one sample) whatever the shard's
    size, and with `part_bytes` whatever its images' sizes: two to three times `part_bytes` (the
    part's pixels, their copy on the way out, one image being decoded), plus what Ray Data's output
    buffer gathers of parts already yielded (blocks of up to 128 MiB). Each part is
    yielded as an Arrow table that wraps the pickle: Ray Data's builder of rows from dicts copied a
    part's hundreds of MB several times (0.6 s for 236 MB, as long as decoding it).

    A read failure (TransientReadError) is retried here, `read_retries` times with a growing pause,
    reading the shard again and skipping the parts already yielded; then it is raised and the shard
    is reported uncommitted. Ray's own task retries stay Ray Data's default, for lost workers and nodes.

    With `yield_cpu` (the encoder computes on the CPU) decoding runs only when the encoder leaves a
    core idle: a CPU forward uses every core, and a decode that takes one of them stalls all its
    threads, not one.
    """
    if yield_cpu and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    name, url, done = batch["dataset"][0].as_py(), batch["input"][0].as_py(), set(batch["skip"][0].as_py())
    bound = (part_bytes or {}).get(name)
    for attempt in range(read_retries + 1):
        try:
            for number, samples, last in cut_parts(iter_shard(datasets[name], url), rows_per_commit[name],
                                                   bound, lambda sample: sample_bytes(sample, pixels)):
                if number not in done:
                    # No local holds the part or its row: while the next part is decoded, this one's pixels
                    # are gone and its pickle is held by its consumer alone.
                    yield part_row(name, url, number, last, decode_part(samples, pixels, max_pixels, jpeg_on_device))
                    done.add(number)
            return
        except TransientReadError:
            if attempt == read_retries:
                raise
            time.sleep(RETRY_BACKOFF_S * 2 ** attempt)


def cut_parts(samples, step: int | None, part_bytes: int | None = None, size=None):
    """Samples -> (part number, its samples, whether it is the last): `step` samples a part (all of
    them when None), fewer where the next sample's `size(sample)` would take the part past `part_bytes`
    (a part holds at least one sample). A part is handed on once the next sample shows it is not
    the last."""
    part, number, held = [], 0, 0
    for sample in samples:
        cost = size(sample) if part_bytes else 0
        if part and ((step and len(part) == step) or (part_bytes and held + cost > part_bytes)):
            yield number, part, False
            part, number, held = [], number + 1, 0
        part.append(sample)
        held += cost
    yield number, part or [Sample(SHARD_ERROR_KEY, error="empty shard: no samples")], True


def sample_bytes(sample: Sample, pixels: CpuPixels) -> int:
    """What a sample weighs in its read task: its encoded bytes, plus the pixels the CPU step makes
    of it, sized from the image's header alone: at the scale libjpeg's draft will decode it to
    (`encoder.jpeg_draft`), and whatever `precompute.max_image_pixels` says, so a resumed run with
    another bound cuts the same parts. A header that cannot be read counts its bytes only: the
    image will be skipped."""
    data = sample.image or b""
    if sample.error is not None or not data:
        return len(data)
    try:
        image = open_header(data)
        if pixels.draft_to:  # as decode_image drafts it: the size changes, nothing is decoded
            image.draft(None, (pixels.draft_to, pixels.draft_to))
        width, height = image.size
    except Exception:  # a broken header: decode_part records the reason
        return len(data)
    return len(data) + pixels.held_bytes(width, height)


def part_row(name: str, url: str, number: int, last: bool, part) -> pa.Table:
    """A one-row table naming the part and holding it: `payload` is its pickle less the pixels, which
    go out of band into `buffers`, copied once into one preallocated block. A plain pickle.dumps grew
    its output while writing, beside the pixels: tests/test_read_memory.py's task peaked 58 MiB above
    its start that way, 46 MiB this way, for parts of 15 MiB."""
    buffers = []
    payload = pickle.dumps(part, protocol=5, buffer_callback=buffers.append)
    views = [b.raw() for b in buffers]
    offsets = np.zeros(len(views) + 1, np.int64)
    np.cumsum([v.nbytes for v in views], out=offsets[1:])
    block = pa.allocate_buffer(int(offsets[-1]))  # Arrow's own memory: no Python object behind the row
    filled = np.frombuffer(block, np.uint8)
    for view, start, stop in zip(views, offsets[:-1], offsets[1:]):
        filled[start:stop] = np.frombuffer(view, np.uint8)
    del views, buffers, filled  # the part's pixels go with the caller's part
    pixels = pa.Array.from_buffers(pa.large_binary(), len(offsets) - 1, [None, pa.array(offsets).buffers()[1], block])
    return pa.table({"dataset": [name], "input": [url], "part": [number], "last": [last], "payload": [payload],
                     "buffers": pa.LargeListArray.from_arrays(pa.array([0, len(pixels)], pa.int64()), pixels)})


def load_part(payload: pa.Scalar, buffers: pa.Scalar):
    """A part from its row of `part_row`; its pixel arrays are writable copies of the row's bytes."""
    return pickle.loads(payload.as_buffer(), buffers=[bytearray(b.as_buffer()) for b in buffers.values])
