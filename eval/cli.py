"""`litpipe eval` and `litpipe search`."""

from __future__ import annotations

import argparse

from litpipe.config import add_config_args, config_from_args
from litpipe.errors import UserError
from litpipe.eval.defaults import chosen_checkpoint, chosen_dataset


def register(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="zero-shot and retrieval metrics of a text tower on every eval set",
        description="Evaluate a text tower on the cached eval sets of pipeline.yaml; writes eval.json, "
        "eval.md and eval.png under {workdir}/eval and prints the table.")
    add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", help="a text-tower folder (default: eval.checkpoint or {workdir}/train/final)")
    evaluate.set_defaults(func=_eval)

    search = commands.add_parser(
        "search", help="text-to-image search over a cache with a trained text tower",
        description="Embed a query with the text tower and print the closest cached images (key, score, caption).")
    search.add_argument("query", help='what to look for, e.g. "a red apple"')
    add_config_args(search)
    search.add_argument("--k", type=int, default=10, help="results to show (default: %(default)s)")
    search.add_argument("--dataset", help="the `data` entry to search (default: the first eval set, else train.dataset)")
    search.add_argument("--checkpoint", help="a text-tower folder (default: eval.checkpoint or {workdir}/train/final)")
    search.add_argument("--html", metavar="OUT.html", help="also write a contact sheet of the images found")
    search.set_defaults(func=_search)

    from litpipe.eval.serve import register as register_serve

    register_serve(commands)


def _eval(args: argparse.Namespace) -> int:
    from litpipe.eval.stage import run

    run(config_from_args(args), checkpoint=args.checkpoint)
    return 0


def _search(args: argparse.Namespace) -> int:
    from litpipe.eval.search import CacheSearch, write_contact_sheet

    cfg = config_from_args(args)
    if args.k < 1:
        raise UserError(f"--k {args.k}: must be at least 1")
    dataset = chosen_dataset(cfg, args.dataset)
    search = CacheSearch(cfg, dataset, chosen_checkpoint(cfg, args.checkpoint))
    hits = search.search(args.query, args.k)
    print(f"{args.query!r} in {dataset} (cache {search.cache.id}):")
    for hit in hits:
        print(f"{hit['rank']:>4}  {hit['score']:.3f}  {hit['key']}  {hit['captions'][0] if hit['captions'] else ''}")
    if args.html:
        print(f"contact sheet: {write_contact_sheet(search, args.query, hits, args.html)}")
    return 0
