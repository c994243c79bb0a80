"""What every fault test asserts once the job has been resumed, and the tally docs/reliability.md is made from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from litpipe.store.maintenance import remove_orphans, verify
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
    problems = verify(cache)
    assert all("cache rm" in p and "--orphans" in p for p in problems), problems  # only what --orphans removes
    remove_orphans(cache)
    assert verify(cache) == []
    named = {"manifest.json", "errors.jsonl"} | {r["path"] for r in cache.parts()}
    cache.fs.invalidate_cache(cache.path)
    present = {p[len(cache.path.rstrip("/")) + 1:] for p in cache.fs.find(cache.path)}
    assert {p for p in present if not p.startswith("commits/")} == named, present


def training_outcome(workdir: str) -> dict:
    """What a finished training run leaves that a resumed or restarted one must equal: every logged step's
    numbers (metrics.jsonl, and TensorBoard as its own reader sees it), the final weights, the checkpoint
    folder's files, the summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from litpipe.models.text_tower import load_text_tower

    folder = Path(workdir) / "train"
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    tower, _, _ = load_text_tower(str(folder / "final"))
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {"steps": [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["temperature"]) for r in records],
            "tensorboard": [(e.step, e.value) for e in events.Scalars("train/loss")],
            "weights": {k: v.clone() for k, v in tower.state_dict().items()},
            "checkpoints": sorted(p.name for p in (folder / "checkpoints").iterdir()),
            "summary": (folder / "summary.json").exists()}


def record(stage: str, fault: str, outcome: str, times: int = 1, lost: str = "nothing") -> None:
    """A fault injected `times` times and what came of it, appended to $LITPIPE_FAULT_REPORT (the full run sets it)."""
    report = os.environ.get("LITPIPE_FAULT_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps({"stage": stage, "fault": fault, "times": times, "outcome": outcome, "lost": lost}) + "\n")
