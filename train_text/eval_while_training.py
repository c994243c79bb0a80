"""Evaluation while training (train.eval_every): rank 0 scores the tower on the eval sets every N steps
and at the end, logs the numbers and keeps the best tower by train.keep_best.

The eval sets' image vectors are loaded once (the image tower never runs); each evaluation runs only
the text side. The other ranks wait at a barrier, so they stall for the evaluation and no longer.
Evaluating draws no random numbers and leaves the tower in training mode, so a run's losses are the
same with and without it.
"""

from __future__ import annotations

import json

import fsspec

from litpipe.config import PipelineConfig
from litpipe.scoring.suite import EvalSuite, flat_metrics
from litpipe.models.text_tower import CONFIG_FILE
from litpipe.train_text.metrics_log import MetricsLog


class EvalWhileTraining:
    """The eval suite of `cfg`, the log its numbers go to, and the best value of train.keep_best so far."""

    def __init__(self, cfg: PipelineConfig, log: MetricsLog):
        self.cfg, self.log = cfg, log
        self.suite = EvalSuite(cfg)
        self.best = _best_so_far(self.best_dir) if cfg.train.keep_best else None

    @property
    def best_dir(self) -> str:
        return f"{self.cfg.train_dir}/best"

    def __call__(self, run, step: int) -> dict[str, float]:
        """Score `run.tower` at `step`; write the metrics; save it as the best when it is."""
        run.tower.eval()
        results = self.suite.evaluate(*run.text_side(), run.device)
        run.tower.train()
        metrics = flat_metrics(results)
        self.log.write_eval(step, metrics, flat_metrics(results, "chance"))
        name = self.cfg.train.keep_best
        if name and name in metrics and (self.best is None or metrics[name] > self.best):
            self.best = metrics[name]
            run.tower.save(self.best_dir, {
                "cache_id": run.cache.id, "step": step, "keep_best": name, "value": metrics[name],
                "loss": self.cfg.train.loss, "dataset": self.cfg.train.dataset,
                "encoder": self.cfg.encoder.spec()})
        return metrics


def _best_so_far(best_dir: str) -> float | None:
    """The value the best tower was kept for, when a resumed run finds one."""
    try:
        with fsspec.open(f"{best_dir}/{CONFIG_FILE}", "r") as f:
            return json.load(f)["meta"]["value"]
    except FileNotFoundError:
        return None
