"""An S3 protocol server (moto) on 127.0.0.1 for the benchmarks, with fsspec pointed at it.

The server runs in its own process, so it does not share the benchmark's interpreter lock: the
figures then count the client's requests, not moto's Python competing with them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import fsspec


def free_port() -> int:
    """A 127.0.0.1 port no one listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(log=subprocess.DEVNULL) -> tuple[subprocess.Popen, str]:
    """A moto server in its own process on a free 127.0.0.1 port, its output to `log`, once it
    accepts connections; (the process, its endpoint URL)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    for _ in range(100):  # up within a few seconds
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return server, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def moto_s3(bucket: str = "bench"):
    """Yield an s3fs filesystem on a fresh moto server with `bucket` created; the server stops after."""
    server, endpoint = start_moto()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir(bucket)
        yield fs
    finally:
        server.terminate()
        server.wait()
