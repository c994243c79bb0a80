"""`litpipe precompute`: embed every dataset of pipeline.yaml (or the ones named) into the store."""

from __future__ import annotations

import argparse
import json

from litpipe.config import add_config_args, config_from_args


def register(commands) -> None:
    parser = commands.add_parser(
        "precompute", help="run the locked image encoder once over the datasets into the embedding store",
        description="Embed every dataset under `data` with `encoder` into `store.root`. Only input shards not yet "
                    "committed are read, so re-running after a crash finishes the job and a complete cache is reused.",
    )
    add_config_args(parser)
    parser.add_argument("--dataset", action="append", metavar="NAME",
                        help="only this `data` entry (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=_precompute)


def _precompute(args: argparse.Namespace) -> int:
    from .stage import run

    summary = run(config_from_args(args), datasets=args.dataset)
    if args.json:
        print(json.dumps(summary.as_json()["datasets"], indent=2))
    for line in summary.report:
        print(line)
    summary.raise_if_incomplete()
    return 0
