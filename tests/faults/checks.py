"""What every fault test asserts once the job has been resumed, and the tally docs/reliability.md is made from."""

from __future__ import annotations

import json
import os

from litpipe.store.cache import EmbeddingCache

from precompute_samples import cache_rows


def assert_same_cache(cache: EmbeddingCache, reference: EmbeddingCache) -> None:
    """Complete, every key once in the reference's order, vectors bit-identical, the same skipped
    samples; verify clean once `cache rm --orphans` has run; no file left that nothing reads."""
    assert cache.complete and cache.id == reference.id
    got, want = cache_rows(cache), cache_rows(reference)  # raises on a key committed twice
    assert list(got) == list(want)
    for key, row in want.items():
        assert got[key]["embedding"].tobytes() == row["embedding"].tobytes(), key
        assert {k: v for k, v in got[key].items() if k != "embedding"} == {k: v for k, v in row.items() if k != "embedding"}
    assert sorted(map(json.dumps, cache.errors())) == sorted(map(json.dumps, reference.errors()))
    problems = cache.verify()
    assert all("cache rm" in p and "--orphans" in p for p in problems), problems  # only what --orphans removes
    cache.remove_orphans()
    assert cache.verify() == []
    named = {"manifest.json", "errors.jsonl"} | {r["path"] for r in cache.shards()}
    cache.fs.invalidate_cache(cache.path)
    present = {p[len(cache.path.rstrip("/")) + 1:] for p in cache.fs.find(cache.path)}
    assert {p for p in present if not p.startswith("commits/")} == named, present


def record(stage: str, fault: str, outcome: str, times: int = 1, lost: str = "nothing") -> None:
    """A fault injected `times` times and what came of it, appended to $LITPIPE_FAULT_REPORT (the full run sets it)."""
    report = os.environ.get("LITPIPE_FAULT_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"stage": stage, "fault": fault, "times": times, "outcome": outcome, "lost": lost}) + "\n")
