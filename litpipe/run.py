"""`litpipe run`: the pipeline, precompute -> train -> eval, then one summary.

Stages never call each other: each finds its inputs in the store (caches by encoder and data
fingerprint) or under `workdir` (the train stage's final text tower), so this file only sequences them.
"""

from __future__ import annotations

import json
from pathlib import Path

from litpipe.config import PipelineConfig
from litpipe.eval import stage as eval_stage
from litpipe.scoring.search_index import require_faiss
from litpipe.precompute import stage as precompute_stage
from litpipe.train_text import stage as train_stage


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Each stage's `run(cfg) -> dict` in order; write and print the summary."""
    require_faiss()  # the eval stage needs it: say so before hours of precompute and training
    summary = {"precompute": precompute_stage.run(cfg)}
    precompute_stage.raise_if_incomplete(summary["precompute"])  # never train on a cache with holes
    summary["train"] = train_stage.run(cfg)
    summary["eval"] = eval_stage.run(cfg)
    out = Path(cfg.workdir) / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n== litpipe run: done; summary: {out}")
    for name, stage_summary in summary.items():
        for line in stage_summary.get("report", []):
            print(f"[{name}] {line}")
    return summary
