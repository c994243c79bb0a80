"""An S3 protocol server (moto) on 127.0.0.1 for the benchmarks, with fsspec pointed at it."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import fsspec


@contextlib.contextmanager
def moto_s3(bucket: str = "bench"):
    """Yield an s3fs filesystem on a fresh moto server with `bucket` created; the server stops after."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request would bury the figures
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = f"http://127.0.0.1:{port}"
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir(bucket)
        yield fs
    finally:
        server.stop()
