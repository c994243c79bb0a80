"""The fault proxy forwards S3 traffic faithfully and injects each fault kind for real.

Attempt counts asserted below are those of the pinned stack: s3fs's own retry loop
(`S3FileSystem.retries`, default 5), botocore's (`config_kwargs={"retries": ...}`) and aiohttp's
single silent resend of an idempotent request (GET/PUT/HEAD) after a connection reset.
"""

import base64
import errno
import http.client
import zlib

import fsspec
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from fault_proxy import FaultProxy

# botocore retries off (`total_max_attempts` counts the first try; `max_attempts` does not),
# s3fs's own loop off, and a short read timeout for the "slow" fault.
NO_RETRY = {"retries": {"total_max_attempts": 1}, "read_timeout": 1, "connect_timeout": 1}
RETRY = {"retries": {"total_max_attempts": 4, "mode": "standard"}, "read_timeout": 1, "connect_timeout": 1}


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(upstream=s3_server["endpoint_url"]) as p:
        yield p


@pytest.fixture
def root(s3_root):
    return s3_root.removeprefix("s3://")


def s3(url, s3fs_retries=None, **config):
    fs = fsspec.filesystem("s3", endpoint_url=url, key="testing", secret="testing", skip_instance_cache=True,
                           config_kwargs=config or None)
    if s3fs_retries is not None:
        fs.retries = s3fs_retries  # a class attribute, not an __init__ argument
    return fs


def test_forwards_plain_operations(proxy, root):
    fs = s3(proxy.url)
    fs.pipe_file(f"{root}/a", b"hello")
    assert fs.cat_file(f"{root}/a") == b"hello"
    assert fs.ls(root, detail=False) == [f"{root}/a"]
    assert fs.info(f"{root}/a")["size"] == 5
    with fs.open(f"{root}/x", "xb") as f:  # If-None-Match: * on the PUT
        f.write(b"first")
    with pytest.raises(FileExistsError):
        with fs.open(f"{root}/x", "xb") as f:
            f.write(b"second")
    assert fs.cat_file(f"{root}/x") == b"first"
    big = bytes(range(256)) * (6 * 2**20 // 256)  # two parts: initiate, 2 x part PUT, complete
    with fs.open(f"{root}/big", "wb", block_size=5 * 2**20) as f:
        f.write(big[:5 * 2**20])  # reaching block_size flushes part 1
        f.write(big[5 * 2**20:])
    assert fs.cat_file(f"{root}/big") == big
    assert fs.cat_file(f"{root}/big", start=10, end=20) == big[10:20]
    assert proxy.seen("POST", "?uploads") and len(proxy.seen("PUT", "partNumber=")) == 2
    assert all(r.status is not None and r.fault is None for r in proxy.requests)
    assert [r.status for r in proxy.seen("PUT", f"{root}/x")] == [200, 412]


def test_forwards_chunked_and_aws_chunked_bodies(proxy, s3_server, root):
    """Over plain http botocore sends Content-Length bodies (aws-chunked trailers are https-only),
    so chunked transfer is driven by hand here: plain chunked, and aws-chunked inside chunked."""
    port = int(proxy.url.rsplit(":", 1)[1])
    data = b"chunky payload " * 100
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))
    aws = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % (len(data), data, crc)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("PUT", f"/{root}/aws", body=iter([aws[:100], aws[100:]]), encode_chunked=True, headers={
        "Content-Encoding": "aws-chunked", "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "x-amz-decoded-content-length": str(len(data)), "x-amz-trailer": "x-amz-checksum-crc32"})
    assert conn.getresponse().read() == b""
    conn.request("PUT", f"/{root}/plain", body=iter([b"abc", b"defg"]), encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    direct = s3(s3_server["endpoint_url"])
    assert direct.cat_file(f"{root}/aws") == data
    assert direct.cat_file(f"{root}/plain") == b"abcdefg"
    assert proxy.seen("PUT", f"{root}/aws")[0].headers["Transfer-Encoding"] == "chunked"


# kind -> (operation, exception the caller sees, attempts the proxy saw)
NO_RETRY_CASES = {
    "503": ("get", OSError, 1),
    "500": ("get", OSError, 1),
    "reset": ("get", EndpointConnectionError, 2),  # aiohttp resends once; not an OSError
    "slow": ("get", ReadTimeoutError, 1),  # an OSError (via requests.exceptions)
    "lost_response": ("put", EndpointConnectionError, 2),
}


@pytest.mark.parametrize("kind", NO_RETRY_CASES)
def test_each_fault_reaches_the_caller_without_retries(proxy, s3_server, root, kind):
    op, error, attempts = NO_RETRY_CASES[kind]
    s3(s3_server["endpoint_url"]).pipe_file(f"{root}/k", b"old")
    method = "GET" if op == "get" else "PUT"
    rule = proxy.add_rule(method, f"{root}/k", kind, count=10, delay=3)
    fs = s3(proxy.url, s3fs_retries=1, **NO_RETRY)
    with pytest.raises(error) as caught:
        fs.cat_file(f"{root}/k") if op == "get" else fs.pipe_file(f"{root}/k", b"new")
    assert rule.fired == attempts == len(proxy.seen(method, f"{root}/k"))
    if kind in ("503", "500"):
        code = {"503": "SlowDown", "500": "InternalError"}[kind]
        assert isinstance(caught.value.__cause__, ClientError)
        assert caught.value.__cause__.response["Error"]["Code"] == code
        assert caught.value.errno == {"503": errno.EBUSY, "500": errno.EREMOTEIO}[kind]
    if kind == "lost_response":  # the PUT took effect although the caller got an error
        assert s3(s3_server["endpoint_url"]).cat_file(f"{root}/k") == b"new"
    else:
        assert all(r.status in (None, int(kind) if kind.isdigit() else 200) for r in proxy.seen(method))


@pytest.mark.parametrize("kind", ["503", "500", "reset", "slow"])
@pytest.mark.parametrize("op", ["get", "put"])
def test_botocore_retries_hide_transient_faults(proxy, root, kind, op):
    fs = s3(proxy.url, s3fs_retries=1, **RETRY)
    fs.pipe_file(f"{root}/k", b"old")
    method = "GET" if op == "get" else "PUT"
    before = len(proxy.seen(method, f"{root}/k"))
    rule = proxy.add_rule(method, f"{root}/k", kind, count=2, delay=3)
    if op == "get":
        assert fs.cat_file(f"{root}/k") == b"old"
    else:
        fs.pipe_file(f"{root}/k", b"new")
        assert fs.cat_file(f"{root}/k") == b"new"
    assert rule.fired == 2
    assert [r.fault for r in proxy.seen(method, f"{root}/k")][before:before + 3] == [kind, kind, None]


def test_s3fs_own_loop_retries_slowdown(proxy, root):
    """With botocore's retries off, s3fs still retries a SlowDown (it matches the message),
    but not an InternalError."""
    fs = s3(proxy.url, s3fs_retries=3, **NO_RETRY)
    fs.pipe_file(f"{root}/k", b"v")
    slowdown = proxy.add_rule("GET", f"{root}/k", "503", count=2)
    assert fs.cat_file(f"{root}/k") == b"v" and slowdown.fired == 2
    internal = proxy.add_rule("GET", f"{root}/k", "500", count=2)
    with pytest.raises(OSError):
        fs.cat_file(f"{root}/k")
    assert internal.fired == 1


def test_lost_response_on_exclusive_create_looks_like_a_conflict(proxy, root):
    """The resend of a PUT whose reply was lost meets its own object: If-None-Match fails with 412,
    so an exclusive create that did succeed raises FileExistsError."""
    fs = s3(proxy.url, s3fs_retries=1, **NO_RETRY)
    rule = proxy.add_rule("PUT", f"{root}/once", "lost_response", count=1)
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{root}/once", b"mine", mode="create")
    assert rule.fired == 1
    assert [r.status for r in proxy.seen("PUT", f"{root}/once")] == [None, 412]
    assert fs.cat_file(f"{root}/once") == b"mine"


def test_rules_match_method_path_and_count(proxy, root):
    fs = s3(proxy.url, s3fs_retries=1, **NO_RETRY)
    fs.pipe_file(f"{root}/k", b"v")
    rule = proxy.add_rule("GET", f"{root}/k", "500", count=1)
    assert fs.info(f"{root}/k")["size"] == 1  # a HEAD: not matched
    with pytest.raises(OSError):
        fs.cat_file(f"{root}/k")
    assert fs.cat_file(f"{root}/k") == b"v"  # count exhausted
    assert rule.fired == 1
    proxy.clear()
    assert proxy.requests == [] and proxy.rules == []
    with pytest.raises(ValueError):
        proxy.add_rule("GET", "x", "teapot")
