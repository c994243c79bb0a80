"""`litpipe sweep`: many text-side experiments over caches encoded once, as Ray Tune trials.

The driver checks every trial's config, encodes what no cache holds yet (one precompute per distinct
encoder and data) and builds each token or text-feature cache the trials need once, before any trial
starts: trials only read caches, so two of them never race to build one. Each trial is `litpipe
run`'s train and eval steps in its own folder ({out}/trials/NAME), one process, with the resources the
sweep file gives it; Ray Tune runs them side by side, stops the weak ones early (ASHA, on eval while
training) and, after a kill, restores the sweep without rerunning a finished trial (an unfinished one
continues from its last checkpoint). A failed trial is reported with its error; the others go on.
"""

from __future__ import annotations

import json
import os
from functools import partial

import fsspec

from litpipe.config import PipelineConfig
from litpipe.files import write_atomic
from litpipe.eval import stage as eval_stage
from litpipe.precompute import stage as precompute_stage
from litpipe.progress import QUIET, QUIET_LIBRARIES
from litpipe.ray_cluster import init_ray
from litpipe.train_text import stage as train_stage

from .spec import Sweep, load_sweep
from .table import write_results

TUNE_NAME = "trials"  # Ray Tune's experiment folder under {out}/tune
TRIAL_RECORD = "trial.json"  # a finished trial's final metrics, in its folder


def run_sweep(path: str, restart: bool = False) -> dict:
    """Prepare the caches, run (or restore) the trials, write the table; returns the results."""
    sweep = load_sweep(os.path.abspath(path))
    prepare(sweep)
    grid = tune_trials(sweep, restart)
    return write_results(sweep, grid)


def prepare(sweep: Sweep) -> None:
    """Encode every dataset the trials name (reused where a cache holds it) and build each token or
    text-feature cache once, here, so no trial builds one."""
    from litpipe.train_text.trainer import build_run

    encoded, texts = set(), set()
    for trial in sweep.trials:
        cfg = sweep.config(trial)
        data = json.dumps([cfg.encoder.model_dump(mode="json"), cfg.store.model_dump(mode="json"),
                           {k: v.model_dump(mode="json") for k, v in cfg.data.items()}], sort_keys=True)
        if data not in encoded:
            precompute_stage.run(cfg).raise_if_incomplete()
            encoded.add(data)
        text = json.dumps([data, text_side(cfg)], sort_keys=True)
        if text not in texts:
            build_run(cfg)  # what a trial would build first: its token cache, or its text-feature cache
            texts.add(text)


def text_side(cfg: PipelineConfig) -> dict:
    """What a trial's token or text-feature cache depends on."""
    t = cfg.train
    return {"dataset": t.dataset, "cache": t.cache, "tokenizer": t.tokenizer, "tower": t.tower.model_dump(mode="json"),
            "text_model": t.text_model.model_dump(mode="json") if t.text_model else None,
            "pretokenize": t.pretokenize, "shuffle_captions": t.shuffle_captions}


def tune_trials(sweep: Sweep, restart: bool):
    """Ray Tune's ResultGrid of every trial: a new sweep, or the one under {out}/tune restored."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = sweep.spec
    init_ray(sweep.config(sweep.trials[0]).ray)
    trainable = tune.with_resources(partial(run_trial, sweep.path), {"cpu": spec.trial.cpus, "gpu": spec.trial.gpus})
    storage = f"{sweep.out}/tune"
    if not restart and tune.Tuner.can_restore(f"{storage}/{TUNE_NAME}"):
        tuner = tune.Tuner.restore(f"{storage}/{TUNE_NAME}", trainable, resume_unfinished=True, resume_errored=False)
    else:
        asha = spec.asha and ASHAScheduler(time_attr="training_iteration", grace_period=spec.asha.grace_period,
                                           reduction_factor=spec.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.name for t in sweep.trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.concurrent, scheduler=asha or None,
                                        metric=spec.metric if asha else None, mode=spec.mode if asha else None,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    return tuner.fit()


def _trial_name(trial) -> str:
    return trial.config["trial"]


def run_trial(sweep_path: str, config: dict) -> None:
    """One trial, in a Ray Tune worker: train (continuing from its checkpoint after a kill), report each
    evaluation while training, then evaluate as `litpipe run` does and report the final metrics, which
    trial.json keeps: a trial run again after a kill (before Ray Tune saved that it finished) reports
    them instead of training again."""
    from ray import tune

    os.environ.update({QUIET: "1", **QUIET_LIBRARIES})  # Ray Tune's table is the sweep's progress, not N bars
    sweep = load_sweep(sweep_path, check=False)  # the driver checked every trial's config
    trial = next(t for t in sweep.trials if t.name == config["trial"])
    cfg = sweep.config(trial)
    fs, record = fsspec.core.url_to_fs(f"{cfg.workdir}/{TRIAL_RECORD}")
    if fs.exists(record):
        tune.report(json.loads(fs.cat_file(record)))
        return
    from litpipe.train_text.trainer import LATEST

    checkpoints = (cfg.train.checkpoint_dir or f"{cfg.train_dir}/checkpoints").rstrip("/")
    checkpoint_fs, latest = fsspec.core.url_to_fs(f"{checkpoints}/{LATEST}")
    resume = checkpoint_fs.exists(latest)  # killed mid-training: continue from its last checkpoint
    summary = train_stage.run(cfg, resume, on_eval=lambda step, metrics: tune.report({**metrics, "step": step}))
    final = {**eval_stage.run(cfg).metrics, "step": summary.steps, "final": 1}
    write_atomic(fs, record, json.dumps(final).encode())
    tune.report(final)
