"""`litpipe`: one CLI over every stage, driven by pipeline.yaml.

Each stage's `cli` module adds its own commands through `register(commands)`; they are listed
here in pipeline order.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from typing import NoReturn

import litpipe
from litpipe.config import DEFAULT_CONFIG, add_config_args, config_from_args, defaults_yaml
from litpipe.errors import INTERRUPTED, UserError
from litpipe.progress import be_quiet
from litpipe.ray_cluster import VERBOSE_ENV
from litpipe.eval import cli as eval_cli
from litpipe.serve import cli as serve_cli
from litpipe.precompute import cli as precompute_cli
from litpipe.store import cli as store_cli
from litpipe.sweep import cli as sweep_cli
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
                                   description="Train and evaluate pipeline.yaml's text tower three times, as a sweep "
                                   "on Ray Tune (L: encoder.pretrained as given; u: encoder.pretrained null; control: "
                                   "train.shuffle_captions), and compare their evals in one table and plot with chance; "
                                   "run again after a kill, it resumes.")
    add_config_args(ablation)
    ablation.add_argument("--out", default="runs/ablation", help="folder for the three trials and the comparison "
                          "(default: %(default)s)")
    ablation.set_defaults(func=_ablation)
    sweep_cli.register(commands)

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


def leave(code: int) -> NoReturn:
    """End the process with `code` and nothing after it.

    Python's own exit stops the threads still alive at that point (Arrow's I/O pool calling back into
    fsspec, a prefetch thread in torch, Ray's) by unwinding them in place, and a C++ frame answers that
    with std::terminate or a segfault: "ok", then an abort (apache/arrow#34314, #38352); "interrupted",
    then exit -11. So the work that needs an orderly end gets it here (Ray's local cluster is shut
    down, with Ctrl-C held off so a second one cannot break it; log handlers and the streams are
    flushed) and the process ends with os._exit. Every file litpipe writes is closed or committed
    before `main` returns.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can reach it
                pass
        os._exit(code)


def entry() -> NoReturn:
    """The `litpipe` command (and `python -m litpipe`): `main`, and whatever it raises, end through `leave`."""
    try:
        code = main()
    except SystemExit as done:  # argparse: --help, a usage error
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    except KeyboardInterrupt:  # before a command started (its own are answered by `main`)
        print("litpipe: interrupted", file=sys.stderr)
        code = INTERRUPTED
    except BaseException:  # a bug: its traceback, then the same orderly end
        traceback.print_exc()
        code = 1
    leave(code)


if __name__ == "__main__":
    entry()
