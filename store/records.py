"""A cache's part records, held as the compact JSON line each one is and parsed when asked for.

Every process that opens a cache holds all its records: the run's driver at finalize, a reader for as
long as it reads. A record as a Python dict is about 2.5 kB (3.6 kB with three skip records); its
compact JSON line is 450-900 bytes. At 10,000 parts that was 36 MB of the driver's peak (the 10M-image
rehearsal, docs/benchmarks.md); at a billion images of 4,096-image parts it would be a gigabyte.
Readers take one record at a time, so a dict lives only while it is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence


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
