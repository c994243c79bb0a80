"""`litpipe ablation`: LiT's Figure 3 in miniature, the same text-tower training on three image sides.

L is the locked pretrained image tower of pipeline.yaml (what `litpipe run` trains on); u is the same
architecture randomly initialised (`encoder.pretrained: null`); the control is L with every image's
captions swapped for another's (`train.shuffle_captions: true`), which must stay at chance. The three
arms are a sweep (`sweeps/lit-figure3.yaml` is the same as a file): the caches are encoded once, the
arms train side by side on Ray Tune under `{out}/trials/`, and a killed ablation resumes. The
comparison lands in ablation.json, ablation.md and ablation.png, beside the sweep's own table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from litpipe.config import load_config, parse_override
from litpipe.errors import UserError
from litpipe.eval.report import metric_label, pct
from litpipe.sweep.runner import run_sweep
from litpipe.sweep.table import plot

ARMS = {
    "L": ("locked pretrained image tower", {}),
    "u": ("random image tower", {"encoder.pretrained": None}),
    "control": ("L with shuffled captions", {"train.shuffle_captions": True}),
}


def run_ablation(config: str, overrides: list[str], out: str | Path) -> dict:
    """Run the three arms as a sweep, then write and print the comparison; returns it."""
    out = Path(out).resolve()
    if not load_config(config, overrides).encoder.pretrained:
        raise UserError("ablation: encoder.pretrained is null, so L and u would be the same random tower; point "
                        "encoder.pretrained at the pretrained image tower to compare (the demo's: data/openmoji/image_tower.pt)")
    given = dict(map(parse_override, overrides))  # --set's, in every arm (paths in them from the working folder)
    arms = {arm: {**given, **extra} for arm, (_, extra) in ARMS.items()}
    out.mkdir(parents=True, exist_ok=True)
    sweep_file = out / "ablation.sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"base": os.path.abspath(config), "arms": arms, "out": str(out),
                                          "settings_from": os.getcwd(), "trial": {"cpus": 1}, "concurrent": 3}))
    sweep = run_sweep(str(sweep_file))
    failed = [row for row in sweep["trials"] if row["status"] != "done"]
    if failed:
        raise UserError(f"ablation: arm {failed[0]['arm']} did not finish ({failed[0]['error'] or failed[0]['status']}); "
                        f"its folder: {failed[0]['folder']}; run the same command again to resume")
    folders = {row["arm"]: Path(row["folder"]) for row in sweep["trials"]}
    evals = {arm: json.loads((folders[arm] / "eval" / "eval.json").read_text()) for arm in ARMS}
    rows = [{"dataset": dataset, "task": task, "metric": name, "chance": result["chance"][name],
             **{arm: evals[arm][task][dataset]["metrics"][name] for arm in ARMS}}
            for task in ("retrieval", "zeroshot") for dataset, result in evals["L"][task].items()
            for name in result["metrics"]]
    results = {"arms": {arm: {"what": what, "eval_json": str(folders[arm] / "eval" / "eval.json")}
                        for arm, (what, _) in ARMS.items()}, "rows": rows}
    table = markdown_table(rows)
    (out / "ablation.json").write_text(json.dumps(results, indent=2, allow_nan=True))
    (out / "ablation.md").write_text("\n".join(table) + "\n")
    plot(sweep, out / "ablation.png", "LiT ablation: the same text-tower training on three image towers")
    print("\n".join(["", "== litpipe ablation: L (locked pretrained) vs u (random) vs control (shuffled captions)",
                     *table, f"(details: {out / 'ablation.json'}, plot: {out / 'ablation.png'})"]))
    return results


def markdown_table(rows: list[dict]) -> list[str]:
    lines = ["| dataset | task | metric | L | u | control | chance |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['task']} | {metric_label(r['metric'])} | "
                     + " | ".join(pct(r[k]) for k in (*ARMS, "chance")) + " |")
    return lines
