"""Run an iterator a few items ahead in a background thread.

Reading Parquet, casting tensors and tokenising release the GIL, so producing the next batches
overlaps the consumer's step. One helper for every prefetch: errors surface in the consumer, and
a consumer that stops early stops (and closes) the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def prefetched(items: Iterable[T], depth: int, name: str) -> Iterator[T]:
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        iterator = iter(items)
        try:
            if all(put(item) for item in iterator):
                put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)
        finally:
            getattr(iterator, "close", lambda: None)()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
