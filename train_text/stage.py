"""`litpipe run`'s train step: fit the text tower on the train cache; eval reads {workdir}/train/final."""

from __future__ import annotations

from litpipe.config import PipelineConfig, training_dataset
from litpipe.train_text.results import TrainSummary


def run(cfg: PipelineConfig, resume: bool = False, on_eval=None) -> TrainSummary:
    """Train on one process or on `train.workers` Ray Train workers; the same summary either way.
    `on_eval(step, metrics)` hears each evaluation while training (one process only: a sweep's trial)."""
    from litpipe.store import resolve_cache

    cache = resolve_cache(cfg, training_dataset(cfg), cfg.train.cache)  # a missing cache is said here, before Ray starts
    text_features = None
    if cfg.train.text_model:  # head-only: the driver builds the text-feature cache once, the workers read it
        from litpipe.train_text.text_feature_job import ensure_text_features

        text_features = ensure_text_features(cfg, cache).id
    if cfg.train.workers > 1:
        from litpipe.train_text.distributed import train_distributed

        return train_distributed(cfg, resume, text_features)
    from litpipe.train_text.trainer import train

    return train(cfg, resume, text_features, on_eval=on_eval)
