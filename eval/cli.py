"""`litpipe eval`."""

from __future__ import annotations

import argparse

from litpipe.config import add_config_args, config_from_args


def register(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="zero-shot and retrieval metrics of a text tower on every eval set",
        description="Evaluate a text tower on the cached eval sets of pipeline.yaml; writes eval.json, "
        "eval.md and eval.png under {workdir}/eval and prints the table.")
    add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", help="a text-tower folder (default: eval.checkpoint or {workdir}/train/final)")
    evaluate.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from litpipe.eval.stage import run

    run(config_from_args(args), checkpoint=args.checkpoint)
    return 0
