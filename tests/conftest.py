"""Fixtures shared across the stages' tests. Append only; each stage keeps its own in its test files."""

import pytest

# A small randomly initialised open_clip architecture: real open_clip code, fast on 2 CPU cores.
TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the whole test session (starting one costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on loopback for the session.

    Sets AWS credentials, AWS_ENDPOINT_URL and FSSPEC_S3_ENDPOINT_URL in os.environ (so processes
    started afterwards, Ray workers included, inherit them) and fsspec's config for this process,
    so a plain `fsspec.filesystem("s3")` or an `s3://` URL reaches it. Yields {"endpoint_url",
    "bucket", "env", "storage_options"}; most tests want `s3_root` below.
    """
    import os
    import socket

    import fsspec
    import fsspec.config
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("litpipe-test")
    yield {"endpoint_url": endpoint, "bucket": "litpipe-test", "env": env,
           "storage_options": {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}}
    fsspec.config.conf["s3"] = saved_conf
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_root(s3_server):
    """A fresh, empty `s3://litpipe-test/<random>` prefix on the moto server."""
    import uuid

    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:10]}"
