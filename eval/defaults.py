"""What an eval command uses when the user names nothing: the train stage's text tower, the first eval set.

Kept free of torch so the CLI stays quick to start.
"""

from __future__ import annotations

from litpipe.config import PipelineConfig
from litpipe.errors import UserError


def chosen_checkpoint(cfg: PipelineConfig, requested: str | None = None) -> str:
    """`requested`, else eval.checkpoint, else where the train stage leaves its final text tower."""
    return requested or cfg.eval.checkpoint or cfg.final_text_tower


def chosen_dataset(cfg: PipelineConfig, requested: str | None = None) -> str:
    """`requested`, else the first eval set, else the training set; a `data` entry either way."""
    eval_sets = [*cfg.eval.retrieval, *(z.dataset for z in cfg.eval.zeroshot)]
    dataset = requested or next(iter(eval_sets), cfg.train.dataset)
    if dataset not in cfg.data:
        raise UserError(f"--dataset {dataset}: no such `data` entry; known: {', '.join(cfg.data)}")
    return dataset
