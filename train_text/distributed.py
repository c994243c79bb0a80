"""`train.workers > 1`: the same training loop in Ray Train TorchTrainer workers (gloo on CPU, nccl on GPU).

Ray Train sets up torch.distributed; the loop reads rank and world size from it, so nothing here
but the launch differs from a single-process run. Each checkpoint the loop writes is reported to
Ray Train (a pointer to it, not a copy), so when a worker dies Ray Train restarts the worker group
(`train.max_failures` times) and the new workers continue from that checkpoint, as `--resume`
would: same weights, optimiser, schedule, RNG and data position; metrics cut back to the step.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import fsspec

from litpipe.config import PipelineConfig
from litpipe.errors import UserError
from litpipe.ray_cluster import init_ray
from litpipe.train_text.results import TrainSummary

STOPPED = "stopped.json"  # a NonFiniteStep's message, rank 0's, for the driver


def train_distributed(cfg: PipelineConfig, resume: bool = False, text_features: str | None = None) -> TrainSummary:
    """Run `trainer.train` on `train.workers` Ray Train workers; rank 0's summary."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg.ray)
    workdir = cfg.workdir if "://" in cfg.workdir else str(Path(cfg.workdir).resolve())
    # Workers may start in another directory: relative paths are made absolute here.
    cfg = cfg.model_copy(update={"workdir": workdir})
    storage = f"{cfg.train_dir}/ray"
    fs, root = fsspec.core.url_to_fs(storage)
    if fs.exists(root):  # Ray Train would hand a new run the last run's checkpoint; --resume reads the run's own
        fs.rm(root, recursive=True)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "resume": resume, "cwd": str(Path.cwd()),
                           "text_features": text_features, "stopped": f"{storage}/{STOPPED}"},
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(storage_path=storage, name="train",
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray Train's TrainingFailedError: a worker's own UserError is the message that helps
        raise _user_error(err) or err
    if fs.exists(f"{root}/{STOPPED}"):
        raise UserError(json.loads(fs.cat_file(f"{root}/{STOPPED}"))["error"])
    return TrainSummary.read(f"{cfg.train_dir}/summary.json")  # written by rank 0


def _user_error(err: BaseException) -> UserError | None:
    """The UserError a failed worker raised, found in Ray Train's error (per rank, maybe wrapped), if any."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [e.__cause__, getattr(e, "cause", None), *getattr(e, "worker_failures", {}).values()]
    return None


def _worker(loop_config: dict) -> None:
    import os

    import ray.train

    from litpipe.config import validate_config
    from litpipe.train_text.trainer import NonFiniteStep, train

    os.chdir(loop_config["cwd"])  # relative data and store paths in the config mean the driver's
    restarted = ray.train.get_checkpoint() is not None  # a new worker group after a failure: continue the run
    try:
        train(validate_config(loop_config["cfg"]), resume=loop_config["resume"] or restarted,
              text_features=loop_config["text_features"], on_checkpoint=_report_checkpoint)
    except NonFiniteStep as err:  # raised on every rank at once (the loss is global); a restart would repeat it
        if ray.train.get_context().get_world_rank() == 0:
            with fsspec.open(loop_config["stopped"], "w") as f:
                f.write(json.dumps({"error": str(err)}))


def _report_checkpoint(step: int, saved: str | None) -> None:
    """Every rank at each checkpoint (Ray Train's report is a barrier): rank 0 reports where the checkpoint of
    `step` lies, so a restarted worker group is handed it; the file itself stays where the run wrote it."""
    import ray.train

    if saved is None:
        ray.train.report({"step": step}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "litpipe-checkpoint.json").write_text(json.dumps({"step": step, "file": saved}))
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"step-{step:08d}")
