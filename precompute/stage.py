"""`litpipe run`'s precompute step: every dataset under `data` into the store, reusing what is there."""

from __future__ import annotations

from litpipe.config import PipelineConfig
from litpipe.errors import UserError
from litpipe.files import check_reachable
from litpipe.models.image_towers import check_model_name
from litpipe.sources import check_inputs
from .job import describe_encoder, precompute
from .results import PrecomputeSummary


def run(cfg: PipelineConfig, datasets: list[str] | None = None) -> PrecomputeSummary:
    """Precompute `datasets` (default: all of cfg.data); the summary names each cache.

    Everything that can be checked before work starts is: the store and each dataset's inputs can
    be reached, Parquet columns exist, the encoder builds. Shards that still fail after the
    retries are listed in each result's `failed_inputs`; `PrecomputeSummary.raise_if_incomplete` turns them into an error.
    """
    names = datasets or list(cfg.data)
    unknown = [n for n in names if n not in cfg.data]
    if unknown:
        raise UserError(f"--dataset {unknown[0]}: no such dataset under data; known: {', '.join(cfg.data)}")
    if cfg.store.root.startswith("memory://"):
        raise UserError(f"store.root {cfg.store.root}: a memory:// store lives in one process, but precompute writes "
                        "from its Ray workers; use a local folder or an object store")
    check_reachable(cfg.store.root, "store.root")
    for name in names:  # what the config names is there and fits, in seconds, before Ray or a model starts
        check_inputs(name, cfg.data[name])
    check_model_name(cfg.encoder)
    return precompute(cfg, names, describe_encoder(cfg))
