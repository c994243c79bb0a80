"""`litpipe sweep SWEEP.yaml`: run (or resume) a sweep file's trials and print their table."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    parser = commands.add_parser(
        "sweep", help="many text-side experiments over one encode, side by side on Ray Tune, in one table",
        description="Run every trial of a sweep file (a base pipeline.yaml, named arms, a grid or random space over its "
                    "keys) as a Ray Tune trial reading the same caches; a killed sweep run again resumes without "
                    "rerunning finished trials. Writes sweep.json, sweep.md, sweep.png and TensorBoard HParams.")
    parser.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (see litpipe/sweep/spec.py and sweeps/)")
    parser.add_argument("--restart", action="store_true", help="start over instead of resuming the sweep under its out folder")
    parser.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from .runner import run_sweep

    run_sweep(args.sweep, restart=args.restart)
    return 0
