"""`litpipe serve`: the command. Kept free of torch and FastAPI imports, since every `litpipe` call loads it."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys

from litpipe.config import add_config_args, config_from_args
from litpipe.errors import UserError
from litpipe.eval.defaults import chosen_checkpoint, chosen_dataset


def register(commands) -> None:
    serve = commands.add_parser(
        "serve", help="a local web page: search a cache by text, sort it with a zero-shot classifier",
        description="Load a cache and a trained text tower once, then serve a page (and a JSON API, documented "
        "at /docs) to search the cached images by text and to classify them by class names you type.")
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


def _serve(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    dataset = chosen_dataset(cfg, args.dataset)
    _check_port(args.host, args.port)
    if not _is_loopback(args.host):
        print(f"litpipe serve: WARNING: listening on {args.host}: anyone who can reach this machine can query "
              "the cache and see its images", file=sys.stderr)

    import uvicorn

    from litpipe.eval.server import Explorer, create_app

    explorer = Explorer.load(cfg, dataset, chosen_checkpoint(cfg, args.checkpoint), args.cache)
    info = explorer.info()
    if info["images_problem"]:
        print(f"litpipe serve: {info['images_problem']}; results show keys and captions only", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"litpipe serve: {info['num_images']:,} images of `{dataset}` (cache {info['cache_id']}) at "
          f"http://{host}:{args.port}  (API docs: /docs; Ctrl-C stops)", flush=True)
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
