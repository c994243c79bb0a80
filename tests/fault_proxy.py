"""A fault-injecting HTTP proxy on loopback, put between an S3 client and a moto server.

Tests of retry and failure handling need S3 to misbehave on cue (throttle, reset, hang, apply a PUT
but lose its reply); moto alone never does. The proxy forwards every request unchanged and applies
the first matching rule that still has faults left to fire:

    with FaultProxy(upstream=s3_server["endpoint_url"]) as proxy:
        rule = proxy.add_rule("GET", "my/key", "503", count=2)
        fs = fsspec.filesystem("s3", endpoint_url=proxy.url, key="testing", secret="testing",
                               skip_instance_cache=True)
        ...
        assert rule.fired == 2 and proxy.seen("GET", "my/key")
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("503", "500", "reset", "slow", "lost_response")
ERROR_BODIES = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
# Hop-by-hop headers describe one connection, not the message, so they are not copied across.
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
              "proxy-connection"}


@dataclass
class Rule:
    """Fail the first `count` requests whose method is `method` ("*": any) and whose target
    (path and query) contains `path`. `fired` counts the faults injected so far."""

    method: str
    path: str
    kind: str
    count: int = 1
    delay: float = 5.0  # seconds, for kind "slow"
    fired: int = 0

    def matches(self, method: str, target: str) -> bool:
        return self.fired < self.count and self.method in ("*", method) and self.path in target


@dataclass
class Seen:
    """One request the proxy handled; status is None where the client got no response at all."""

    method: str
    path: str
    status: int | None
    fault: str | None = None
    headers: dict = field(default_factory=dict, repr=False)


class FaultProxy:
    """Threaded forwarding proxy; start/stop with `with` (or start()/stop())."""

    def __init__(self, upstream: str, timeout: float = 30.0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.timeout = timeout
        self.rules: list[Rule] = []
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True  # idle keep-alive connections must not block stop()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes handlers sleeping on a "slow" rule
        self._server.shutdown()
        self._server.server_close()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_rule(self, method: str, path: str, kind: str, count: int = 1, delay: float = 5.0) -> Rule:
        if kind not in KINDS:
            raise ValueError(f"fault kind {kind!r} is not one of {KINDS}")
        rule = Rule(method.upper(), path, kind, count, delay)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def seen(self, method: str = "*", path: str = "") -> list[Seen]:
        """The recorded requests with this method ("*": any) whose target contains `path`."""
        with self._lock:
            return [r for r in self.requests if method in ("*", r.method) and path in r.path]

    def _take(self, method: str, target: str) -> Rule | None:
        with self._lock:  # matching and counting together, so concurrent requests never overshoot
            for rule in self.rules:
                if rule.matches(method, target):
                    rule.fired += 1
                    return rule
        return None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body as sent on the wire: Content-Length bytes, or the data of a chunked body
    (an aws-chunked payload inside it passes through untouched, for the upstream to decode)."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        out = bytearray()
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # HTTP trailers, if any
                return bytes(out)
            out += handler.rfile.read(size)
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close with SO_LINGER 0, so the client sees ECONNRESET rather than a clean EOF."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()
    handler.close_connection = True


def _handler_for(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

        def log_message(self, *args):
            pass

        def _handle(self):
            method, target = self.command, self.path
            body = _read_body(self)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            rule = proxy._take(method, target)
            kind = rule.kind if rule else None
            seen = Seen(method, target, None, kind, dict(self.headers.items()))
            proxy._record(seen)  # on arrival, so a slow reply landing after clear() is not recorded
            if kind in ERROR_BODIES:
                status, code, message = ERROR_BODIES[kind]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>").encode()
                seen.status = status
                self._reply(status, [("Content-Type", "application/xml")], xml, method)
                return
            if kind == "reset":
                return _reset(self)
            if len(body) or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.timeout)
            try:
                upstream.request(method, target, body=body if body or method in ("PUT", "POST") else None,
                                 headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                status, out_headers = response.status, response.getheaders()
            except OSError as exc:
                status, out_headers, payload = 502, [("Content-Type", "text/plain")], str(exc).encode()
            finally:
                upstream.close()
            if kind == "lost_response":  # the upstream applied the request; the client never learns
                return _reset(self)
            if kind == "slow" and proxy._stopping.wait(rule.delay):
                return
            seen.status = status
            try:
                self._reply(status, out_headers, payload, method)
            except OSError:
                self.close_connection = True  # the client gave up (read timeout) meanwhile

        def _reply(self, status, headers, payload, method):
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in HOP_BY_HOP and not (name.lower() == "content-length" and method != "HEAD"):
                    self.send_header(name, value)
            if method != "HEAD":  # a HEAD reply keeps upstream's Content-Length and has no body
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler
