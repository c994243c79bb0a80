"""A cache's part records, held as the compact JSON line each one is and parsed when asked for, and
the complete manifest's layout that lets them be read and written as lines.

Every process that opens a cache holds all its records: the run's driver at finalize, a reader for as
long as it reads. A record as a Python dict is about 2.5 kB (3.8 kB with three skip records); its
compact JSON line is 450-900 bytes. Held as dicts, with the copies finalize made, the records grew a
run's driver by 80 MB at 10,000 parts (docs/benchmarks.md); a billion images in 4,096-image parts
would have wanted 2 GB. Readers take one record at a time, so a dict lives only while it is used.

A complete manifest lists its records under `shards`, last and one a line, so opening one splits the
lines off its head and never builds a dict a part either (a 100,000-part manifest made 240 MB of them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence


SHARDS_OPEN, SEPARATOR, SHARDS_CLOSE = b',\n "shards": [\n  ', b",\n  ", b"\n ]\n}"


def record_line(record: dict) -> bytes:
    """One record as its line: keys sorted, no spaces (the manifest and the held form alike)."""
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


class PartRecords(Sequence):
    """Part records in input order, read-only: each item a fresh dict, so a caller may change it freely."""

    __slots__ = ("_lines",)

    def __init__(self, lines: list[bytes]):
        self._lines = lines

    @classmethod
    def of(cls, records: Iterable[dict]) -> PartRecords:
        return cls([record_line(r) for r in records])

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return PartRecords(self._lines[index])
        return json.loads(self._lines[index])

    def __iter__(self) -> Iterator[dict]:
        return (json.loads(line) for line in self._lines)

    def replaced(self, new: dict[int, bytes]) -> PartRecords:
        """These records with those at the indices of `new` replaced by its lines."""
        lines = list(self._lines)
        for index, line in new.items():
            lines[index] = line
        return PartRecords(lines)

    def lines(self) -> list[bytes]:
        return self._lines


def manifest_file(head: bytes, records: PartRecords) -> bytes:
    """A complete cache's manifest file: `head` (the manifest less its records, indented JSON ending
    in `}`) with `shards` added last, one record a line. Any JSON reader reads it whole."""
    return head[:-2] + SHARDS_OPEN + SEPARATOR.join(records.lines()) + SHARDS_CLOSE


def split_manifest(raw: bytes) -> tuple[bytes, PartRecords | None]:
    """A manifest file as (its JSON less `shards`, its records) when laid out as `manifest_file` writes
    it, else (the file, None) to be read whole (caches finalized before it, hand-written ones). A line
    never holds a newline (JSON escapes them), so the split is exact; each line is parsed once here,
    so a damaged one is found when the cache is opened, as a damaged manifest was."""
    start = raw.rfind(SHARDS_OPEN)
    if start < 0 or not raw.endswith(SHARDS_CLOSE):
        return raw, None
    body = raw[start + len(SHARDS_OPEN):len(raw) - len(SHARDS_CLOSE)]
    lines = body.split(SEPARATOR) if body else []
    if any(b"\n" in line for line in lines):  # an indented list (finalized before this layout)
        return raw, None
    if not all(isinstance(json.loads(line), dict) for line in lines):
        raise ValueError("a record of `shards` is not a JSON object")
    return raw[:start] + b"\n}", PartRecords(lines)
