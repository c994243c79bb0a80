"""The pipeline's last stage: evaluate a text tower on every eval set of pipeline.yaml, from the caches.

Eval sets go through precompute like training data, so the image tower never runs here: image
embeddings come from the store, text features from the trained tower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from litpipe.config import PipelineConfig
from litpipe.devices import resolve_device
from litpipe.config import chosen_checkpoint
from litpipe.eval.report import markdown_table, write_report
from litpipe.scoring.suite import EvalSuite, flat_metrics
from litpipe.models.text_tower import load_text_tower


@dataclass
class EvalSummary:
    """Where the results went and the flat metrics; `skipped` says why when there was nothing to evaluate."""

    checkpoint: str | None = None
    eval_json: str | None = None
    plot: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)  # the Markdown table printed
    skipped: str | None = None

    def as_json(self) -> dict:
        return asdict(self)


def evaluate(cfg: PipelineConfig, checkpoint: str | None = None) -> dict:
    """Every metric of every eval set, with the cache ids and checkpoint they came from."""
    url = chosen_checkpoint(cfg, checkpoint)
    device = resolve_device(cfg.eval.device, "eval.device")
    tower, tokenizer, meta = load_text_tower(url, device=str(device))
    results = {"checkpoint": url, "checkpoint_meta": meta, "encoder": cfg.encoder.spec()}
    return {**results, **EvalSuite(cfg).evaluate(tower, tokenizer, device)}


def run(cfg: PipelineConfig, checkpoint: str | None = None) -> EvalSummary:
    """Evaluate, write eval.json / eval.md / eval.png under {workdir}/eval, print the table."""
    if not cfg.eval.retrieval and not cfg.eval.zeroshot:
        return EvalSummary(skipped="no eval sets in pipeline.yaml (eval.retrieval, eval.zeroshot)")
    results = evaluate(cfg, checkpoint)
    paths = write_report(results, Path(cfg.workdir) / "eval")
    table = markdown_table(results)
    print("\n".join(["", f"== litpipe eval: {results['checkpoint']}", *table, f"(details: {paths['json']}, plot: {paths['png']})"]))
    return EvalSummary(results["checkpoint"], str(paths["json"]), str(paths["png"]), flat_metrics(results), table)
