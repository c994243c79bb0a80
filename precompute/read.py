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
from litpipe.models.cpu_pixels import CpuPixels
from litpipe.sources import SHARD_ERROR_KEY, Sample, TransientReadError, iter_shard

from .decode import decode_part

RETRY_BACKOFF_S = 1.0  # the first retry of a shard waits this long, each later one twice as long


def read_parts(batch: pa.Table, datasets: dict[str, DatasetConfig], rows_per_commit: dict[str, int | None],
               pixels: CpuPixels, max_pixels: int, jpeg_on_device: bool, yield_cpu: bool, read_retries: int):
    """One input shard (a batch of one row, naming its dataset) -> one table per part not yet
    committed: a row holding its decoded `Part`, pickled.

    Part k is samples [k * rows_per_commit, (k + 1) * rows_per_commit) in input order, so every
    run cuts the same parts; an empty shard is one part holding one error. Samples stream from the
    shard, so a task holds one part (plus one sample) whatever the shard's size. Each part is
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
    for attempt in range(read_retries + 1):
        try:
            for number, samples, last in cut_parts(iter_shard(datasets[name], url), rows_per_commit[name]):
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


def cut_parts(samples, step: int | None):
    """Samples -> (part number, its samples, whether it is the last), `step` samples a part (all of
    them when None). A part is handed on once the next sample shows it is not the last."""
    part, number = [], 0
    for sample in samples:
        if step and len(part) == step:
            yield number, part, False
            part, number = [], number + 1
        part.append(sample)
    yield number, part or [Sample(SHARD_ERROR_KEY, error="empty shard: no samples")], True


def part_row(name: str, url: str, number: int, last: bool, part) -> pa.Table:
    """A one-row table naming the part and holding it pickled; the pickle's bytes are wrapped, not copied."""
    payload = pickle.dumps(part, protocol=5)
    offsets = pa.py_buffer(np.array([0, len(payload)], np.int64))
    return pa.table({"dataset": [name], "input": [url], "part": [number], "last": [last],
                     "payload": pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(payload)])})
