"""`litpipe run`: the pipeline, precompute -> train -> eval, then one summary.

Stages never call each other: each finds its inputs in the store (caches by encoder and data
fingerprint) or under `workdir` (the train stage's final text tower), so this file only sequences them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from litpipe.config import PipelineConfig
from litpipe.eval import stage as eval_stage
from litpipe.scoring.search_index import require_faiss
from litpipe.precompute import stage as precompute_stage
from litpipe.train_text import stage as train_stage
from litpipe.eval.stage import EvalSummary
from litpipe.precompute.results import PrecomputeSummary
from litpipe.train_text.results import TrainSummary


@dataclass
class RunSummary:
    """Each stage's own summary, in the order they ran."""

    precompute: PrecomputeSummary
    train: TrainSummary
    eval: EvalSummary

    def stages(self) -> dict:
        return {"precompute": self.precompute, "train": self.train, "eval": self.eval}


def run_pipeline(cfg: PipelineConfig) -> RunSummary:
    """Each stage's `run(cfg)` in order; write {workdir}/summary.json and print every stage's report."""
    require_faiss()  # the eval stage needs it: say so before hours of precompute and training
    precomputed = precompute_stage.run(cfg)
    precomputed.raise_if_incomplete()  # never train on a cache with holes
    summary = RunSummary(precomputed, train_stage.run(cfg), eval_stage.run(cfg))
    out = Path(cfg.workdir) / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({name: stage.as_json() for name, stage in summary.stages().items()}, indent=2))
    print(f"\n== litpipe run: done; summary: {out}")
    for name, stage in summary.stages().items():
        for line in stage.report:
            print(f"[{name}] {line}")
    return summary
