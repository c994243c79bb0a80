"""A sweep's result: one row per trial (its settings, final metrics or error), chance beside them, as
sweep.json, sweep.md, sweep.png and TensorBoard's HParams view ({out}/tensorboard)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from litpipe.eval.report import metric_label, pct
from litpipe.plots import pyplot

from .spec import Sweep


def write_results(sweep: Sweep, grid) -> dict:
    """Collect Ray Tune's results by trial name, write and print the table; returns sweep.json's content."""
    by_name = {result.config["trial"]: result for result in grid}
    rows, chance = [], {}
    for trial in sweep.trials:
        result = by_name.get(trial.name)
        eval_json = Path(sweep.out) / "trials" / trial.name / "eval" / "eval.json"
        finished = result is not None and result.error is None and (result.metrics or {}).get("final")
        metrics = {k: v for k, v in (result.metrics or {}).items() if "/" in k} if result is not None else {}
        if finished and eval_json.exists():
            chance.update(_chance(json.loads(eval_json.read_text())))
        rows.append({"trial": trial.name, "arm": trial.arm, "settings": trial.settings, "metrics": metrics,
                     "status": "done" if finished else ("failed" if result is not None and result.error else "stopped"),
                     "error": str(result.error).strip().splitlines()[-1] if result is not None and result.error else None,
                     "folder": str(Path(sweep.out) / "trials" / trial.name)})
    names = list(dict.fromkeys(name for row in rows for name in row["metrics"]))  # the eval suite's order
    metric = sweep.spec.metric
    done = [r for r in rows if r["status"] == "done" and metric in r["metrics"]]
    best = (max if sweep.spec.mode == "max" else min)(done, key=lambda r: r["metrics"][metric])["trial"] if done else None
    results = {"sweep": sweep.path, "metric": metric, "mode": sweep.spec.mode, "best": best, "metrics": names,
               "chance": chance, "trials": rows}
    out = Path(sweep.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown_table(results)
    (out / "sweep.md").write_text("\n".join(table) + "\n")
    plot(results, out / "sweep.png")
    hparams(results, out / "tensorboard")
    print("\n".join(["", f"== litpipe sweep: {len(rows)} trials ({sum(r['status'] == 'done' for r in rows)} done)",
                     *table, f"(details: {out / 'sweep.json'}, plot: {out / 'sweep.png'}, "
                             f"TensorBoard HParams: {out / 'tensorboard'})"]))
    return results


def _chance(evaluation: dict) -> dict[str, float]:
    return {f"{task}/{dataset}/{name}": value for task in ("retrieval", "zeroshot")
            for dataset, result in evaluation.get(task, {}).items() for name, value in result["chance"].items()
            if not math.isnan(value)}


def markdown_table(results: dict) -> list[str]:
    keys = sorted({k for row in results["trials"] for k in row["settings"]})
    names = results["metrics"]
    head = ["trial", *keys, *[f"{n.split('/')[1]} {metric_label(n.rsplit('/', 1)[-1])}" for n in names], "status"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * (1 + len(keys)) + ["---:"] * len(names) + ["---"]) + " |"]
    for row in results["trials"]:
        best = " (best)" if row["trial"] == results["best"] else ""
        status = row["status"] + (f": {row['error']}" if row["error"] else "")
        lines.append("| " + " | ".join([row["trial"] + best, *[_setting(row["settings"], k) for k in keys],
                                        *[pct(row["metrics"][n]) if n in row["metrics"] else "" for n in names],
                                        status]) + " |")
    lines.append("| chance | " + " | ".join([""] * len(keys) + [pct(results["chance"][n]) if n in results["chance"] else ""
                                                                 for n in names] + [""]) + " |")
    return lines


def _setting(settings: dict, key: str) -> str:
    """A trial's value of `key` as the sweep file would spell it (null, true, {...}); blank where the base's."""
    if key not in settings:
        return ""
    value = settings[key]
    return value if isinstance(value, str) else json.dumps(value)


def plot(results: dict, path: Path, title: str = "litpipe sweep: each trial's final metrics") -> None:
    """One group of bars per metric, one bar per finished trial, chance dashed across each group."""
    names, rows = results["metrics"], [r for r in results["trials"] if r["metrics"]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(rows) * max(len(names), 1)), 4.2))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs = [x + (i - (len(rows) - 1) / 2) * width for x in range(len(names))]
        ax.bar(xs, [100 * row["metrics"].get(n, math.nan) for n in names], width, label=row["trial"])
    for x, name in enumerate(names):
        if name in results["chance"]:
            ax.hlines(100 * results["chance"][name], x - 0.45, x + 0.45, colors="tab:red", linestyles="--",
                      label="chance" if x == 0 else None)
    ax.set_xticks(range(len(names)), [f"{n.split('/')[1]}\n{metric_label(n.rsplit('/', 1)[-1])}" for n in names], fontsize=7)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hparams(results: dict, folder: Path) -> None:
    """Each finished trial's settings and metrics in TensorBoard's HParams view, one run per trial."""
    from torch.utils.tensorboard import SummaryWriter

    for row in results["trials"]:
        if not row["metrics"]:
            continue
        settings = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in row["settings"].items()}
        with SummaryWriter(str(folder / row["trial"])) as writer:
            writer.add_hparams({"arm": row["arm"], **settings}, {f"hparam/{k}": v for k, v in row["metrics"].items()},
                               run_name=".")
