"""Read tasks: an input shard -> its parts, decoded to uint8 on the CPU and pickled for the encoder.

This module and what it imports stay free of torch, so a read worker starts in about a second
while the encoder actor beside it imports torch and open_clip.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow as pa

from litpipe.config import DatasetConfig
from litpipe.models.cpu_pixels import CpuPixels
from litpipe.sources import SHARD_ERROR_KEY, Sample, read_shard

from .decode import decode_part


def read_parts(batch: pa.Table, datasets: dict[str, DatasetConfig], rows_per_commit: dict[str, int | None],
               pixels: CpuPixels, max_pixels: int, jpeg_on_device: bool, yield_cpu: bool):
    """One input shard (a batch of one row, naming its dataset) -> one table per part not yet
    committed: a row holding its decoded samples, pickled.

    Part k is samples [k * rows_per_commit, (k + 1) * rows_per_commit) in input order, so every
    run cuts the same parts; an empty shard is one part holding one error. Each part is yielded as
    an Arrow table that wraps the pickle: Ray Data's builder of rows from dicts copied a part's
    hundreds of MB several times (0.6 s for 236 MB, as long as decoding it).

    With `yield_cpu` (the encoder computes on the CPU) decoding runs only when the encoder leaves a
    core idle: a CPU forward uses every core, and a decode that takes one of them stalls all its
    threads, not one.
    """
    if yield_cpu and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    name, url, skip = batch["dataset"][0].as_py(), batch["input"][0].as_py(), set(batch["skip"][0].as_py())
    samples = read_shard(datasets[name], url) or [Sample(SHARD_ERROR_KEY, error="empty shard: no samples")]
    step = rows_per_commit[name] or len(samples)
    count = -(-len(samples) // step)
    for part in range(count):
        if part not in skip:
            decoded = decode_part(samples[part * step:(part + 1) * step], pixels, max_pixels, jpeg_on_device)
            payload = pickle.dumps(decoded, protocol=5)
            yield pa.table({"dataset": [name], "input": [url], "part": [part], "last": [part == count - 1],
                            "payload": pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets(len(payload)),
                                                                                  pa.py_buffer(payload)])})


def offsets(size: int) -> pa.Buffer:
    """The offsets of a one-value large_binary array, so its bytes are wrapped and not copied."""
    return pa.py_buffer(np.array([0, size], np.int64))
