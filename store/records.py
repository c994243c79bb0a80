"""A cache's part records, held as the compact JSON line each one is, spooled to local disk past a
megabyte and parsed when asked for; and the complete manifest's layout that lets them be read and
written as lines.

Every process that opens a cache holds all its records: the run's driver at finalize, a reader for as
long as it reads. A record as a Python dict is about 2.5 kB (3.8 kB with three skip records); its
compact JSON line is 450-900 bytes. Held as dicts, with the copies finalize made, the records grew a
run's driver by 80 MB at 10,000 parts (docs/benchmarks.md); held as lines in memory, still 10 kB a part
at 10 million images. In a `Spool` a record costs its holder 16 bytes (where its line is): 1.6 MB at
100,000 parts, the lines in a temporary file. Readers take one record at a time, so a dict lives only
while it is used.

A complete manifest lists its records under `shards`, last and one a line, so opening one splits the
lines off its head and never builds a dict a part either (a 100,000-part manifest made 240 MB of them).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence

SHARDS_OPEN, SEPARATOR, SHARDS_CLOSE = b',\n "shards": [\n  ', b",\n  ", b"\n ]\n}"
SPOOL_MEMORY = 1 << 20  # bytes of lines a spool holds in memory before it moves them to a temporary file


def record_line(record: dict) -> bytes:
    """One record as its line: keys sorted, no spaces (the manifest and the held form alike)."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


class Spool:
    """Bytes appended once and read back by place: in memory up to SPOOL_MEMORY, then in an unnamed
    temporary file on local disk (gone with this object). Thread-safe, and safe across a fork (a
    DataLoader's workers): the file is read and written at explicit offsets (`os.pread`), never through
    a file position parent and child share, and a forked process that appends takes a copy first."""

    __slots__ = ("_memory", "_file", "_end", "_pid", "_lock")

    def __init__(self):
        self._memory, self._file, self._end, self._pid, self._lock = bytearray(), None, 0, os.getpid(), threading.Lock()

    def append(self, data: bytes) -> int:
        """Store `data`; where it starts."""
        with self._lock:
            start = self._end
            if self._file is None and start + len(data) <= SPOOL_MEMORY:
                self._memory += data
            else:
                if self._file is None or self._pid != os.getpid():
                    self._file = self._own_file(bytes(self._memory) if self._file is None else self._read(0, start))
                    self._memory = bytearray()
                os.pwrite(self._file.fileno(), data, start)
            self._end += len(data)
        return start

    def read(self, start: int, size: int) -> bytes:
        with self._lock:
            return self._read(start, size)

    def _read(self, start: int, size: int) -> bytes:
        if self._file is None:
            return bytes(self._memory[start:start + size])
        return os.pread(self._file.fileno(), size, start)

    def _own_file(self, content: bytes):
        file = tempfile.TemporaryFile(prefix="litpipe-records-", buffering=0)
        os.pwrite(file.fileno(), content, 0)
        self._pid = os.getpid()
        return file

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()


class PartRecords(Sequence):
    """Part records in input order, read-only: each item a fresh dict, so a caller may change it freely.
    The lines live in a `Spool` (shared by the slices and `replaced` copies of one set of records);
    pickled, the records travel as their lines."""

    __slots__ = ("_spool", "_starts", "_sizes")

    def __init__(self, lines: Iterable[bytes] = (), spool: Spool | None = None):
        self._spool = Spool() if spool is None else spool
        self._starts, self._sizes = array("q"), array("q")
        for line in lines:
            self._add(line)

    @classmethod
    def of(cls, records: Iterable[dict]) -> PartRecords:
        return cls(record_line(r) for r in records)

    def _add(self, line: bytes) -> None:
        self._starts.append(self._spool.append(line))
        self._sizes.append(len(line))

    @classmethod
    def placed(cls, spool: Spool, starts: Iterable[int], sizes: Iterable[int]) -> PartRecords:
        """The records whose lines are in `spool` at `starts`, `sizes` long."""
        records = cls(spool=spool)
        records._starts, records._sizes = array("q", starts), array("q", sizes)
        return records

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PartRecords.placed(self._spool, self._starts[index], self._sizes[index])
        return json.loads(self.line(index))

    def line(self, index: int) -> bytes:
        return self._spool.read(self._starts[index], self._sizes[index])

    def __iter__(self) -> Iterator[dict]:
        return (json.loads(line) for line in self.lines())

    def lines(self) -> Iterator[bytes]:
        return (self._spool.read(start, size) for start, size in zip(self._starts, self._sizes))

    def replaced(self, new: Iterable[tuple[int, bytes]]) -> PartRecords:
        """These records with the one at each index of `new`'s (index, line) pairs replaced by its line
        (`new` is consumed as it comes: a generator of rewrites as they end)."""
        copy = PartRecords.placed(self._spool, self._starts, self._sizes)
        for index, line in new:
            copy._starts[index], copy._sizes[index] = copy._spool.append(line), len(line)
        return copy

    def __reduce__(self):
        return PartRecords, (list(self.lines()),)


def manifest_chunks(head: bytes, records: PartRecords) -> Iterator[bytes]:
    """A complete cache's manifest file, in pieces to write one after the other: `head` (the manifest
    less its records, indented JSON ending in `}`) with `shards` added last, one record a line. Any
    JSON reader reads it whole."""
    yield head[:-2] + SHARDS_OPEN
    for i, line in enumerate(records.lines()):
        yield SEPARATOR + line if i else line
    yield SHARDS_CLOSE


def split_manifest(raw: bytes) -> tuple[bytes, PartRecords | None]:
    """A manifest file as (its JSON less `shards`, its records) when laid out as `manifest_chunks` writes
    it, else (the file, None) to be read whole (caches finalized before it, hand-written ones). A line
    never holds a newline (JSON escapes them), so the split is exact; each line is parsed once here,
    so a damaged one is found when the cache is opened, as a damaged manifest was."""
    start = raw.rfind(SHARDS_OPEN)
    if start < 0 or not raw.endswith(SHARDS_CLOSE):
        return raw, None
    begin, end = start + len(SHARDS_OPEN), len(raw) - len(SHARDS_CLOSE)
    if raw.count(b"\n", begin, end) != raw.count(SEPARATOR, begin, end):  # an indented list (finalized before)
        return raw, None
    return raw[:start] + b"\n}", PartRecords(_checked_lines(raw, begin, end))


def _checked_lines(raw: bytes, begin: int, end: int) -> Iterator[bytes]:
    """The lines of raw[begin:end] between SEPARATORs, each checked to be a JSON object."""
    while begin < end:
        stop = raw.find(SEPARATOR, begin, end)
        stop = end if stop < 0 else stop
        line = raw[begin:stop]
        if not isinstance(json.loads(line), dict):
            raise ValueError("a record of `shards` is not a JSON object")
        yield line
        begin = stop + len(SEPARATOR)
