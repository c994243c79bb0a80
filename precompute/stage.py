"""`litpipe run`'s precompute step: every dataset under `data` into the store, reusing what is there."""

from __future__ import annotations

from litpipe.config import PipelineConfig
from litpipe.errors import UserError
from litpipe.models.image_encoder import load_encoder

from .job import precompute_dataset


def run(cfg: PipelineConfig, datasets: list[str] | None = None) -> dict:
    """Precompute `datasets` (default: all of cfg.data); the summary names each cache."""
    names = datasets or list(cfg.data)
    unknown = [n for n in names if n not in cfg.data]
    if unknown:
        raise UserError(f"--dataset {unknown[0]}: no such dataset under data; known: {', '.join(cfg.data)}")
    encoder = load_encoder(cfg.encoder, device="cpu")  # the driver only fingerprints; actors encode
    results = {name: precompute_dataset(cfg, name, encoder) for name in names}
    return {"datasets": results, "report": [report_line(r) for r in results.values()]}


def report_line(result: dict) -> str:
    if result["reused"]:
        return (f"{result['dataset']}: reused cache {result['cache_id']} ({result['rows_in_cache']} rows) at "
                f"{result['cache_url']}, nothing encoded")
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result["skipped_by_reason"].items())) or "none"
    return (f"{result['dataset']}: cache {result['cache_id']}: embedded {result['embedded']}, skipped {result['skipped']} "
            f"({skipped}) from {result['inputs_processed']}/{result['inputs']} input shards in {result['seconds']} s "
            f"({result['images_per_s']} images/s) -> {result['cache_url']}")
