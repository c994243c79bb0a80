"""`litpipe search` and `litpipe serve`: the commands. Kept free of torch and FastAPI imports, since every
`litpipe` call loads them."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from litpipe.config import add_config_args, chosen_checkpoint, chosen_dataset, config_from_args
from litpipe.errors import UserError


def register(commands) -> None:
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

    serve = commands.add_parser(
        "serve", help="a local web page: search a cache by text, sort it with a zero-shot classifier",
        description="Load a cache and a trained text tower once, then serve a page (and a JSON API, described "
        "at /openapi.json) to search the cached images by text and to classify them by class names you type.")
    add_config_args(serve)
    tower = serve.add_mutually_exclusive_group()
    tower.add_argument("--checkpoint", help="a text-tower folder (default: eval.checkpoint or {workdir}/train/final)")
    tower.add_argument("--export", dest="checkpoint", metavar="DIR", help="a `litpipe export` folder instead")
    serve.add_argument("--dataset", help="the `data` entry to serve (default: the first eval set, else train.dataset)")
    serve.add_argument("--cache", help="a cache id or URL to serve instead of the dataset's own cache "
                       "(images still come from the dataset's source shards)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    serve.set_defaults(func=_serve)


def _search(args: argparse.Namespace) -> int:
    from litpipe.serve.search import CacheSearch, write_contact_sheet

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


def _serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dataset = chosen_dataset(cfg, args.dataset)
    _check_port(args.host, args.port)
    if not _is_loopback(args.host):
        print(f"litpipe serve: WARNING: listening on {args.host}: anyone who can reach this machine can query "
              "the cache and see its images", file=sys.stderr)

    import uvicorn

    from litpipe.serve.app import Explorer, create_app

    explorer = Explorer.load(cfg, dataset, chosen_checkpoint(cfg, args.checkpoint), args.cache)
    info = explorer.info()
    if info["images_problem"]:
        print(f"litpipe serve: {info['images_problem']}; results show keys and captions only", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"litpipe serve: {info['num_images']:,} images of `{dataset}` (cache {info['cache_id']}) at "
          f"http://{host}:{args.port}  (API: /openapi.json; Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(explorer), host=args.host, port=args.port, log_level="warning")
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_port(host: str, port: int) -> None:
    """Fail before the slow model load, with the fix, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a just-stopped server's port is free
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); "
                            "pick another port with --port") from None
