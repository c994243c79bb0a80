"""`train.workers > 1`: the same training loop in Ray Train TorchTrainer workers (gloo on CPU, nccl on GPU).

Ray Train sets up torch.distributed; the loop reads rank and world size from it, so nothing here
but the launch differs from a single-process run.
"""

from __future__ import annotations

import json
from pathlib import Path

import fsspec

from litpipe.config import PipelineConfig
from litpipe.ray_cluster import init_ray


def train_distributed(cfg: PipelineConfig, resume: bool = False, text_features: str | None = None) -> dict:
    """Run `trainer.train` on `train.workers` Ray Train workers; rank 0's summary."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg.ray)
    workdir = cfg.workdir if "://" in cfg.workdir else str(Path(cfg.workdir).resolve())
    # Workers may start in another directory: relative paths are made absolute here.
    cfg = cfg.model_copy(update={"workdir": workdir})
    config = cfg.model_dump(mode="json")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": config, "resume": resume, "cwd": str(Path.cwd()), "text_features": text_features},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(storage_path=f"{cfg.train_dir}/ray", name="train"),
    )
    trainer.fit()
    with fsspec.open(f"{cfg.train_dir}/summary.json", "r") as f:  # written by rank 0
        return json.load(f)


def _worker(loop_config: dict) -> None:
    import os

    from litpipe.config import validate_config
    from litpipe.train_text.trainer import train

    os.chdir(loop_config["cwd"])  # relative data and store paths in the config mean the driver's
    train(validate_config(loop_config["cfg"]), resume=loop_config["resume"], text_features=loop_config["text_features"])
