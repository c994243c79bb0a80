"""One way to reach Ray, from pipeline.yaml's `ray` section, for every stage that uses it."""

from __future__ import annotations

import logging
import os

from litpipe.config import RayConfig
from litpipe.progress import MODEL_LOADING_OUTPUT, QUIET, QUIET_LIBRARIES


VERBOSE_ENV = "LITPIPE_VERBOSE"  # "1" (`litpipe -v`): Ray's own log lines on the console too


def worker_env(verbose: bool, environ: dict = os.environ) -> dict[str, str]:
    """Environment for every Ray worker of a run: `litpipe -q` (a cluster's workers do not inherit the
    driver's environment), and no model-loading bars or transformers LOAD REPORT tables, which each
    encoder actor or text-feature worker would repeat into the console with their colour codes
    (`litpipe -v` keeps them). A user's own settings of those variables win."""
    env = {} if verbose else dict(MODEL_LOADING_OUTPUT)
    if environ.get(QUIET):
        env.update({QUIET: "1", **QUIET_LIBRARIES})
    return {**env, **{name: environ[name] for name in env if name in environ}}


def init_ray(cfg: RayConfig):
    """Start a local Ray (no `ray.address` nor RAY_ADDRESS) or join a cluster (`auto`, `ray://...`); idempotent.

    Ray's own INFO and WARNING lines (its start, token authentication, Ray Data's plans and progress
    settings) stay in its session logs unless `litpipe -v`: a clean run prints litpipe's lines, and
    what the workers print (litpipe's warnings among them) still reaches the console.
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    verbose = os.environ.get(VERBOSE_ENV) == "1"
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True, "include_dashboard": False,
              "logging_level": logging.INFO if verbose else logging.ERROR,
              "runtime_env": {"env_vars": worker_env(verbose)}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        kwargs["address"] = address
    else:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ray.init(**kwargs)
    if not verbose:
        import ray.data  # configures its loggers on import: quieted after

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray
