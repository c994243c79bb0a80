"""Progress bars with throughput, off under `litpipe -q` in every process of a run.

`litpipe -q` sets LITPIPE_QUIET, which Ray's workers and subprocesses inherit and which `progress` reads
when a bar starts. tqdm's own TQDM_DISABLE cannot serve: tqdm reads it once, when tqdm is imported,
which is before the command line is parsed, and a bar that passes `disable` itself ignores it.
"""

from __future__ import annotations

import os

from tqdm import tqdm

QUIET = "LITPIPE_QUIET"
# What the libraries litpipe loads models with read for their own bars and load reports: off in Ray's
# workers always (`ray_cluster.worker_env`), everywhere under QUIET.
MODEL_LOADING_OUTPUT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
QUIET_LIBRARIES = {**MODEL_LOADING_OUTPUT, "TQDM_DISABLE": "1"}


def progress(*args, disable: bool | None = False, **kwargs) -> tqdm:
    """A tqdm bar, or a silent one under `litpipe -q`."""
    return tqdm(*args, disable=True if os.environ.get(QUIET) else disable, **kwargs)


def be_quiet() -> None:
    """No progress bars from here on, in this process and every process it starts."""
    os.environ.update({QUIET: "1", **QUIET_LIBRARIES})
