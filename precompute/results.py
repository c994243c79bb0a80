"""What a precompute run tells its caller: one typed record per dataset, one for the run.

The CLI prints their report lines, `litpipe run` writes them as JSON (`as_json`), tests and
callers read their fields by name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from litpipe.errors import RerunToFinish


class PrecomputeIncomplete(RerunToFinish):
    """Input shards that could not be read after the retries: nothing of them was committed."""


@dataclass
class DatasetResult:
    """One dataset's cache after the run, and what the run did to it."""

    dataset: str
    cache_id: str
    cache_url: str
    reused: bool  # nothing was left to encode
    complete: bool
    inputs: int
    inputs_processed: int  # input shards this run had to encode (some or all of their parts)
    failed_inputs: list[str]  # input shards still uncommitted after the retries
    failures: dict[str, str]  # failed input -> why, where the encoder actor said
    embedded: int
    skipped: int
    skipped_by_reason: dict[str, int]
    inputs_reused: int  # adopted from other caches that had embedded them
    reused_from: list[str]
    rows_in_cache: int
    legacy_captions: int  # read as cp1252/Latin-1
    uncaptioned: int  # rows without a caption (kept for zero-shot, left out of training)
    encoded_by: list[str] = field(default_factory=list)  # host:pid of the encoder actors
    decoded_by: list[str] = field(default_factory=list)  # host:pid of the read tasks' workers
    seconds: dict[str, float] = field(default_factory=dict)  # driver's steps: plan, finalize

    def report_line(self) -> str:
        notes = (f"; {self.inputs_reused} input shard(s) adopted from cache(s) {', '.join(self.reused_from)}, "
                 "which had embedded them" if self.inputs_reused else "")
        if self.uncaptioned:
            notes += f"; {self.uncaptioned} image(s) without a caption (for zero-shot; training leaves them out)"
        if self.reused:
            return (f"{self.dataset}: reused cache {self.cache_id} ({self.rows_in_cache} rows) at "
                    f"{self.cache_url}, nothing encoded{notes}")
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_by_reason.items())) or "none"
        failed = f", {len(self.failed_inputs)} FAILED after retries (not committed)" if self.failed_inputs else ""
        legacy = (f"; {self.legacy_captions} caption(s) were not UTF-8 and were read as cp1252/Latin-1"
                  if self.legacy_captions else "")
        return (f"{self.dataset}: cache {self.cache_id}: embedded {self.embedded}, skipped {self.skipped} "
                f"({skipped}) from {self.inputs_processed}/{self.inputs} input shards{failed} -> "
                f"{self.cache_url}{notes}{legacy}")


@dataclass
class PrecomputeSummary:
    """Every dataset's result, and the run's throughput (`images_per_s` None when nothing was encoded)."""

    datasets: dict[str, DatasetResult]
    images: int
    seconds: float
    images_per_s: float | None

    @property
    def report(self) -> list[str]:
        lines = [result.report_line() for result in self.datasets.values()]
        if self.images_per_s is not None:
            lines.append(f"{self.images} images in {self.seconds} s ({self.images_per_s} images/s)")
        return lines

    def as_json(self) -> dict:
        return {**asdict(self), "report": self.report}

    def raise_if_incomplete(self) -> None:
        """A `PrecomputeIncomplete` naming the first input shard that failed after the retries, if any did."""
        failed = [url for result in self.datasets.values() for url in result.failed_inputs]
        if not failed:
            return
        why = {url: reason for result in self.datasets.values() for url, reason in result.failures.items()}
        first = f"{failed[0]}: {why[failed[0]]}" if failed[0] in why else f"{failed[0]}; its error is in the log above"
        raise PrecomputeIncomplete(f"{len(failed)} input shard(s) failed after retries and were not committed (first: "
                                   f"{first}); nothing of them was recorded as bad data: rerun `litpipe precompute` "
                                   "to retry them (once the store has room, if it is full)")
