"""`litpipe run`: every stage that exists, in order, then one summary.

Stages never call each other: each finds its inputs in the store (caches by encoder and data
fingerprint) or under `workdir` (the train stage's checkpoints), so this file only sequences them.
"""

from __future__ import annotations

import json
from pathlib import Path

from litpipe.cli import stage_modules
from litpipe.config import PipelineConfig


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Call `run(cfg) -> dict` of each stage's `stage` module; write and print the summary."""
    summary = {}
    for module in stage_modules("stage"):
        summary[module.STAGE_NAME] = module.run(cfg)
    out = Path(cfg.workdir) / "summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n== litpipe run: done ({', '.join(summary) or 'no stages installed'}); summary: {out}")
    for name, stage_summary in summary.items():
        for line in stage_summary.get("report", []):
            print(f"[{name}] {line}")
    return summary
