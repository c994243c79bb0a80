"""`litpipe run`'s train step: fit the text tower on the train cache; eval reads {workdir}/train/final."""

from __future__ import annotations

from litpipe.config import PipelineConfig, training_dataset


def run(cfg: PipelineConfig, resume: bool = False) -> dict:
    from litpipe.store import resolve_cache

    cache = resolve_cache(cfg, training_dataset(cfg), cfg.train.cache)  # a missing cache is said here, before Ray starts
    text_features = None
    if cfg.train.text_model:  # head-only: the driver builds the text-feature cache once, the workers read it
        from litpipe.train_text.text_feature_job import ensure_text_features

        text_features = ensure_text_features(cfg, cache).id
    if cfg.train.workers > 1:
        from litpipe.train_text.distributed import train_distributed

        summary = train_distributed(cfg, resume, text_features)
    else:
        from litpipe.train_text.trainer import train

        summary = train(cfg, resume, text_features)
    resumed = f", resumed at step {summary['resumed_at']}" if summary["resumed_at"] else ""
    summary["report"] = [
        f"{summary['steps']} steps on cache {summary['cache_id']} ({summary['world_size']} worker(s){resumed}): "
        f"final loss {summary['final_loss'] or float('nan'):.4f}, {summary['samples_per_s']:,.0f} samples/s",
        f"text tower: {summary['artifact']}; loss curve: {summary.get('loss_curve')}",
    ]
    if summary.get("uncaptioned"):
        summary["report"].insert(1, f"{summary['uncaptioned']} image(s) of cache {summary['cache_id']} have no caption "
                                    "(a classification set's): left out of training, kept for zero-shot eval")
    if summary.get("eval_curve"):
        summary["report"].append(f"eval while training: {summary['eval_curve']}"
                                 + (f"; best tower by train.keep_best: {summary['best']}" if summary.get("best") else ""))
    return summary
