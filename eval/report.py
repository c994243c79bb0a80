"""The eval's outputs: eval.json (everything, with provenance), a markdown table, and a PNG.

Every number is printed beside its chance level, so a run that learned nothing (e.g. the
shuffled-caption control) is visibly at chance rather than merely "low".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from litpipe.plots import pyplot

RETRIEVAL_LABELS = {"image_retrieval_recall": "text→image R", "text_retrieval_recall": "image→text R"}
ZEROSHOT_LABELS = {"mean_per_class_recall": "mean per-class recall"}


def metric_label(name: str) -> str:
    """`image_retrieval_recall@5` -> `text→image R@5`, `acc5` -> `top-5`."""
    base, at, k = name.partition("@")
    if at:
        return f"{RETRIEVAL_LABELS.get(base, base)}@{k}"
    if name.startswith("acc"):
        return f"top-{name[3:]}"
    return ZEROSHOT_LABELS.get(name, name)


def markdown_table(results: dict) -> list[str]:
    """One row per (dataset, task, metric): value and chance, in percent."""
    lines = ["| dataset | task | metric | value | chance |", "| --- | --- | --- | ---: | ---: |"]
    for task in ("retrieval", "zeroshot"):
        for dataset, result in results.get(task, {}).items():
            for name, value in result["metrics"].items():
                lines.append(f"| {dataset} | {task} | {metric_label(name)} | {pct(value)} | {pct(result['chance'][name])} |")
    return lines


def pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """eval.json, eval.md and eval.png under `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "png": out / "eval.png"}
    paths["json"].write_text(json.dumps(results, indent=2, default=str, allow_nan=True))
    paths["markdown"].write_text("\n".join(markdown_table(results)) + "\n")
    plot(results, paths["png"])
    return paths


def plot(results: dict, path: Path) -> None:
    """Recall@k and zero-shot bars beside chance, and the most frequent zero-shot confusions."""
    plt = pyplot()
    panels = [("retrieval", d, r) for d, r in results.get("retrieval", {}).items()]
    panels += [("zeroshot", d, r) for d, r in results.get("zeroshot", {}).items()]
    confusion_panels = [(d, r) for d, r in results.get("zeroshot", {}).items() if r.get("top_confusions")]
    count = max(1, len(panels) + len(confusion_panels))
    fig, axes = plt.subplots(1, count, figsize=(5.5 * count, 4.2), squeeze=False)
    axes = list(axes[0])
    for ax, (task, dataset, result) in zip(axes, panels):
        names = [n for n in result["metrics"] if not math.isnan(result["metrics"][n])]
        values = [100 * result["metrics"][n] for n in names]
        chance = [100 * result["chance"][n] for n in names]
        xs = range(len(names))
        bars = ax.bar(xs, values, color="tab:blue" if task == "retrieval" else "tab:green", label="model")
        ax.bar(xs, chance, width=0.8, fill=False, edgecolor="tab:red", linestyle="--", label="chance")
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs), [metric_label(n) for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, min(105, max(5, 1.3 * max(values + chance, default=0))))  # small recalls stay readable
        ax.set_ylabel("%")
        ax.set_title(f"{dataset}: {'retrieval' if task == 'retrieval' else 'zero-shot'}")
        ax.legend(fontsize=8, loc="upper left")
    for ax, (dataset, result) in zip(axes[len(panels):], confusion_panels):
        top = result["top_confusions"][::-1]
        ax.barh(range(len(top)), [c["count"] for c in top], color="tab:orange")
        ax.set_yticks(range(len(top)), [f"{c['true']} → {c['predicted']}" for c in top], fontsize=8)
        ax.set_xlabel("images")
        ax.set_title(f"{dataset}: top confusions (true → predicted)")
    for ax in axes[len(panels) + len(confusion_panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
