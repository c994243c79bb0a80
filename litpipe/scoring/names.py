"""The names of the metrics an eval config yields, known before anything runs (train.keep_best is checked
against them when pipeline.yaml loads); `suite.flat_metrics` gives the same names to the values."""

from __future__ import annotations


def metric_names(eval_cfg) -> list[str]:
    """`{task}/{dataset}/{metric}` for every metric of `eval_cfg` (pipeline.yaml's eval section)."""
    names = [f"retrieval/{name}/{direction}_retrieval_recall@{k}" for name in eval_cfg.retrieval
             for direction in ("image", "text") for k in eval_cfg.ks]
    for z in eval_cfg.zeroshot:
        names += [f"zeroshot/{z.dataset}/acc{k}" for k in z.ks] + [f"zeroshot/{z.dataset}/mean_per_class_recall"]
    return names
