"""One way to reach Ray, from pipeline.yaml's `ray` section, for every stage that uses it."""

from __future__ import annotations

import os

from litpipe.config import RayConfig


def init_ray(cfg: RayConfig):
    """Start a local Ray (address empty) or join a cluster (`auto`, `ray://...`); idempotent."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True, "include_dashboard": False}
    if cfg.address:
        kwargs["address"] = cfg.address
    else:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ray.init(**kwargs)
    return ray
