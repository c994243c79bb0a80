"""What a training run tells its caller: a typed record, written by rank 0 as summary.json.

Ray Train's workers hand it to the driver through that file (`TrainSummary.read`), so the
single-process and the distributed run return the same thing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import fsspec


@dataclass
class TrainSummary:
    steps: int
    resumed_at: int  # 0 for a fresh run
    cache_id: str
    final_loss: float | None  # None when a resumed run had no step left
    samples_per_s: float
    artifact: str  # the final text tower (or heads)
    world_size: int
    uncaptioned: int  # rows of the cache without a caption, left out of training
    view: dict | None = None  # the cache view trained on (train.view): its rule, how many keys, their sha256
    loss_curve: str | None = None  # loss.png, eval.png: rank 0 plots them
    eval_curve: str | None = None
    best: str | None = None  # the best tower by train.keep_best

    @property
    def report(self) -> list[str]:
        resumed = f", resumed at step {self.resumed_at}" if self.resumed_at else ""
        lines = [
            f"{self.steps} steps on cache {self.cache_id} ({self.world_size} worker(s){resumed}): "
            f"final loss {self.final_loss or float('nan'):.4f}, {self.samples_per_s:,.0f} samples/s",
            f"text tower: {self.artifact}; loss curve: {self.loss_curve}",
        ]
        if self.view:
            lines.insert(1, f"view {self.view['name']}: {self.view['excluded']} key(s) of the cache left out "
                            f"(keys sha256 {self.view['keys_sha256'][:12]})")
        if self.uncaptioned:
            lines.insert(1, f"{self.uncaptioned} image(s) of cache {self.cache_id} have no caption "
                            "(a classification set's): left out of training, kept for zero-shot eval")
        if self.eval_curve:
            lines.append(f"eval while training: {self.eval_curve}"
                         + (f"; best tower by train.keep_best: {self.best}" if self.best else ""))
        return lines

    def as_json(self) -> dict:
        return {**asdict(self), "report": self.report}

    def write(self, url: str) -> None:
        with fsspec.open(url, "w") as f:
            f.write(json.dumps(self.as_json(), indent=2))

    @classmethod
    def read(cls, url: str) -> TrainSummary:
        with fsspec.open(url, "r") as f:
            fields = json.load(f)
        fields.pop("report")
        return cls(**fields)
