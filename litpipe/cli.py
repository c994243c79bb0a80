"""`litpipe`: one CLI over every stage, driven by pipeline.yaml.

Each stage's `cli` module adds its own commands through `register(commands)`; they are listed
here in pipeline order.
"""

from __future__ import annotations

import argparse
import os
import sys

import litpipe
from litpipe.config import DEFAULT_CONFIG, add_config_args, config_from_args, defaults_yaml
from litpipe.errors import INTERRUPTED, UserError
from litpipe.progress import be_quiet
from litpipe.ray_cluster import VERBOSE_ENV
from litpipe.eval import cli as eval_cli
from litpipe.serve import cli as serve_cli
from litpipe.precompute import cli as precompute_cli
from litpipe.store import cli as store_cli
from litpipe.train_text import cli as train_cli


def _run(args: argparse.Namespace) -> int:
    from litpipe.run import run_pipeline

    run_pipeline(config_from_args(args))
    return 0


def _ablation(args: argparse.Namespace) -> int:
    from litpipe.demo.ablation import run_ablation

    run_ablation(args.config, args.overrides, args.out)
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    try:
        from litpipe.demo.data import build_demo_data
    except ModuleNotFoundError as err:
        raise UserError(f"demo-data needs the `demo` extra ({err.name} is not installed): "
                        "pip install 'litpipe[demo]'") from None

    build_demo_data(args.out, force=args.force)
    return 0


def _config(args: argparse.Namespace) -> int:
    print(defaults_yaml() if args.defaults else config_from_args(args).model_dump_json(indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="litpipe",
        description="LiT in two stages: embed images once with a locked open_clip tower, then train text towers on the cache.",
    )
    parser.add_argument("--version", action="version", version=f"litpipe {litpipe.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's own log lines too")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run every stage of pipeline.yaml end to end, then summarise",
                              description="Precompute every dataset (reusing caches), train the text tower, evaluate.")
    add_config_args(run)
    run.set_defaults(func=_run)

    ablation = commands.add_parser("ablation", help="LiT's ablation: the same training on the locked pretrained tower, "
                                   "a random one, and shuffled captions, side by side",
                                   description="Run pipeline.yaml three times (L: encoder.pretrained as given; u: "
                                   "encoder.pretrained null; control: train.shuffle_captions) and compare their evals "
                                   "in one table and plot with chance.")
    add_config_args(ablation)
    ablation.add_argument("--out", default="runs/ablation", help="folder for the three runs and the comparison "
                          "(default: %(default)s)")
    ablation.set_defaults(func=_ablation)

    demo = commands.add_parser("demo-data", help="build the embedded OpenMoji demo dataset (no network)",
                               description="Render OpenMoji emoji as images captioned with their names, as WebDataset tar shards, "
                               "and pretrain the demo's image tower on the training emoji's subgroups.")
    demo.add_argument("--out", default="data/openmoji", help="output folder (default: %(default)s)")
    demo.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    demo.set_defaults(func=_demo_data)

    config = commands.add_parser("config", help="print the validated config, or every key with its default",
                                 description="Print pipeline.yaml as litpipe reads it (defaults filled in and overrides "
                                 "applied), or with --defaults every key of the schema with its default and meaning.")
    add_config_args(config)
    config.add_argument("--defaults", action="store_true", help="print the full schema as commented YAML instead")
    config.set_defaults(func=_config)

    for stage_cli in (precompute_cli, train_cli, eval_cli, serve_cli, store_cli):
        stage_cli.register(commands)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """`parser`'s arguments, the config path also after options (`cache export ID --out DIR
    pipeline.yaml`): argparse fills positionals only up to the first option and leaves it over."""
    args, extra = parser.parse_known_args(argv)
    if len(extra) == 1 and not extra[0].startswith("-") and getattr(args, "config", None) == DEFAULT_CONFIG:
        args.config = extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit codes (litpipe/errors.py): 0 done, 2 a user error, 75 rerun to finish, 130 interrupted."""
    args = parse(build_parser(), argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    if args.quiet:
        be_quiet()
    try:
        return args.func(args) or 0
    except UserError as err:
        print(f"litpipe: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("litpipe: interrupted; a rerun resumes where this one stopped", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
