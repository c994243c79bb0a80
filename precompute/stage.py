"""`litpipe run`'s precompute step: every dataset under `data` into the store, reusing what is there."""

from __future__ import annotations

from litpipe.config import PipelineConfig
from litpipe.errors import RerunToFinish, UserError
from litpipe.files import check_reachable
from litpipe.models.image_towers import check_model_name
from litpipe.sources import check_inputs
from .job import describe_encoder, precompute


class PrecomputeIncomplete(RerunToFinish):
    """Input shards that could not be read after the retries: nothing of them was committed."""


def run(cfg: PipelineConfig, datasets: list[str] | None = None) -> dict:
    """Precompute `datasets` (default: all of cfg.data); the summary names each cache.

    Everything that can be checked before work starts is: the store and each dataset's inputs can
    be reached, Parquet columns exist, the encoder builds. Shards that still fail after the
    retries are listed in the summary's `failed_inputs`; `raise_if_incomplete` turns them into an error.
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
    summary = precompute(cfg, names, describe_encoder(cfg))
    summary["report"] = [report_line(r) for r in summary["datasets"].values()]
    if summary["images_per_s"] is not None:
        summary["report"].append(f"{summary['images']} images in {summary['seconds']} s "
                                 f"({summary['images_per_s']} images/s)")
    return summary


def raise_if_incomplete(summary: dict) -> None:
    failed = [url for result in summary["datasets"].values() for url in result["failed_inputs"]]
    if failed:
        why = {url: reason for result in summary["datasets"].values() for url, reason in result["failures"].items()}
        first = f"{failed[0]}: {why[failed[0]]}" if failed[0] in why else f"{failed[0]}; its error is in the log above"
        raise PrecomputeIncomplete(f"{len(failed)} input shard(s) failed after retries and were not committed (first: "
                                   f"{first}); nothing of them was recorded as bad data: rerun `litpipe precompute` "
                                   "to retry them (once the store has room, if it is full)")


def report_line(result: dict) -> str:
    notes = (f"; {result['inputs_reused']} input shard(s) adopted from cache(s) {', '.join(result['reused_from'])}, "
              "which had embedded them" if result.get("inputs_reused") else "")
    if result.get("uncaptioned"):
        notes += f"; {result['uncaptioned']} image(s) without a caption (for zero-shot; training leaves them out)"
    if result["reused"]:
        return (f"{result['dataset']}: reused cache {result['cache_id']} ({result['rows_in_cache']} rows) at "
                f"{result['cache_url']}, nothing encoded{notes}")
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(result["skipped_by_reason"].items())) or "none"
    failed = f", {len(result['failed_inputs'])} FAILED after retries (not committed)" if result["failed_inputs"] else ""
    legacy = (f"; {result['legacy_captions']} caption(s) were not UTF-8 and were read as cp1252/Latin-1"
              if result["legacy_captions"] else "")
    return (f"{result['dataset']}: cache {result['cache_id']}: embedded {result['embedded']}, skipped {result['skipped']} "
            f"({skipped}) from {result['inputs_processed']}/{result['inputs']} input shards{failed} -> "
            f"{result['cache_url']}{notes}{legacy}")
