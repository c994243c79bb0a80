"""`litpipe`: one CLI over every stage, driven by pipeline.yaml.

Each stage package that has a `cli` module adds its own commands through `register(subparsers)`,
so a stage's commands appear exactly when the stage exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from litpipe.config import DEFAULT_CONFIG, PipelineConfig, load_config
from litpipe.errors import UserError

STAGE_PACKAGES = ("litpipe.store", "litpipe.precompute", "litpipe.train_text", "litpipe.eval")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every pipeline command shares: a config path and `--set` overrides."""
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="pipeline.yaml to use (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.batch_size=4096 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def stage_modules(name: str) -> list:
    """The `<stage>.<name>` modules of the stages that are installed, in pipeline order."""
    found = []
    for package in STAGE_PACKAGES:  # the package first: find_spec of `absent.cli` raises rather than answer None
        if importlib.util.find_spec(package) is not None and importlib.util.find_spec(f"{package}.{name}") is not None:
            found.append(importlib.import_module(f"{package}.{name}"))
    return found


def _run(args: argparse.Namespace) -> int:
    from litpipe.run import run_pipeline

    run_pipeline(config_from_args(args))
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from litpipe.demo_data import build_demo_data

    build_demo_data(args.out, force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litpipe",
        description="LiT in two stages: embed images once with a locked open_clip tower, then train text towers on the cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run every stage of pipeline.yaml end to end, then summarise",
                              description="Precompute every dataset (reusing caches), train the text tower, evaluate.")
    add_config_args(run)
    run.set_defaults(func=_run)

    demo = commands.add_parser("demo-data", help="build the embedded OpenMoji demo dataset (no network)",
                               description="Render OpenMoji emoji as images captioned with their names, as WebDataset tar shards.")
    demo.add_argument("--out", default="data/openmoji", help="output folder (default: %(default)s)")
    demo.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    demo.set_defaults(func=_demo_data)

    for module in stage_modules("cli"):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"litpipe: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
