"""One way to reach Ray, from pipeline.yaml's `ray` section, for every stage that uses it."""

from __future__ import annotations

import logging
import os

from litpipe.config import RayConfig


VERBOSE_ENV = "LITPIPE_VERBOSE"  # "1" (`litpipe -v`): Ray's own log lines on the console too


def init_ray(cfg: RayConfig):
    """Start a local Ray (address empty) or join a cluster (`auto`, `ray://...`); idempotent.

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
              "logging_level": logging.INFO if verbose else logging.ERROR}
    if cfg.address:
        kwargs["address"] = cfg.address
    else:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ray.init(**kwargs)
    if not verbose:
        import ray.data  # configures its loggers on import: quieted after

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray
