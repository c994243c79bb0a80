"""precompute and training on a real S3 protocol server (moto on loopback) behind the fault-injecting proxy.

The store throttles (503 SlowDown), resets connections, stalls, and loses the reply of a PUT it
applied, while precompute writes its parts and commit records there and training reads the cache
and writes its checkpoints there. Each run must equal one without faults; a fault that does not
pass must stop it with an error naming the URL and lose nothing. (Reads of input shards that keep
failing are tests/test_precompute_job.py's.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import fsspec.config
import pytest
import torch
from conftest import tiny_train_config

from litpipe.config import validate_config
from litpipe.errors import UserError
from litpipe.models.text_tower import load_text_tower
from litpipe.precompute import stage
from litpipe.store.cache import EmbeddingCache
from litpipe.train_text.trainer import train

from checks import assert_same_cache, record
from fault_proxy import FaultProxy
from precompute_samples import build_planted_dataset, planted_config

pytestmark = [pytest.mark.slow, pytest.mark.faults]


@contextlib.contextmanager
def through(proxy: FaultProxy):
    """This process's S3 requests go through `proxy` (fsspec's config; s3fs makes new clients for it)."""
    saved = fsspec.config.conf["s3"]["endpoint_url"]
    fsspec.config.conf["s3"]["endpoint_url"] = proxy.url
    try:
        yield
    finally:
        fsspec.config.conf["s3"]["endpoint_url"] = saved


def config(tiny_cache, name: str, s3_root: str | None = None) -> dict:
    raw = tiny_train_config(tiny_cache, name, steps=6, checkpoint_every=2)
    if s3_root:
        raw["store"]["root"] = f"{s3_root}/store"
        raw["train"]["checkpoint_dir"] = f"{s3_root}/checkpoints"
    return raw


def trajectory(raw: dict) -> tuple[list, dict]:
    folder = Path(raw["workdir"]) / "train"
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    tower, _, _ = load_text_tower(str(folder / "final"))
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records], tower.state_dict()


@pytest.fixture(scope="module")
def reference(tiny_cache):
    raw = config(tiny_cache, "s3-faults-reference")
    train(validate_config(raw))
    return trajectory(raw)


@pytest.fixture
def s3_cache(tiny_cache, s3_root):
    """The tiny cache, copied to the S3 server."""
    fs = fsspec.filesystem("s3")
    fs.put(str(tiny_cache["tmp"] / "store") + "/", f"{s3_root}/store/", recursive=True)
    return s3_root


def assert_same_run(raw: dict, reference) -> None:
    steps, weights = trajectory(raw)
    assert steps == reference[0]
    assert all(torch.equal(weights[k], v) for k, v in reference[1].items())


def test_training_through_throttling_resets_stalls_and_lost_replies_equals_a_run_without_faults(
        tiny_cache, s3_cache, s3_server, reference):
    raw = config(tiny_cache, "s3-faults-passing", s3_cache)
    with FaultProxy(upstream=s3_server["endpoint_url"]) as proxy, through(proxy):
        rules = [proxy.add_rule("GET", "/shards/", "503", count=3), proxy.add_rule("GET", "/shards/", "reset", count=1),
                 proxy.add_rule("GET", "/shards/", "slow", count=1, delay=2),
                 proxy.add_rule("GET", "manifest.json", "503", count=1),
                 proxy.add_rule("PUT", "step-", "503", count=2),
                 proxy.add_rule("PUT", "latest.json", "lost_response", count=1)]
        train(validate_config(raw))
    assert [r.fired for r in rules] == [r.count for r in rules]
    assert_same_run(raw, reference)
    for rule in rules:
        record("train (S3)", f"{rule.kind} on {rule.method} {rule.path}", "retried; the run equals one without faults",
               rule.fired)


def test_a_checkpoint_write_that_keeps_failing_stops_the_run_naming_the_url_and_resume_finishes_it(
        tiny_cache, s3_cache, s3_server, reference, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore gives up sooner; s3fs's own retries still run
    raw = config(tiny_cache, "s3-faults-failing", s3_cache)
    with FaultProxy(upstream=s3_server["endpoint_url"]) as proxy, through(proxy):
        stuck = proxy.add_rule("PUT", "step-00000004", "503", count=10_000)
        with pytest.raises(UserError, match=rf"train.checkpoint_dir: {s3_cache}/checkpoints/step-00000004.pt: .*reduce your request rate"
                                            r".*checkpoint of step 2 stands.*--resume"):
            train(validate_config(raw))
        assert stuck.fired > 1  # retried before giving up
        proxy.clear()
        latest = json.loads(fsspec.filesystem("s3").cat_file(f"{s3_cache}/checkpoints/latest.json"))
        assert latest["step"] == 2
        train(validate_config(raw), resume=True)
    assert_same_run(raw, reference)
    record("train (S3)", "503 on every PUT of one checkpoint", "stopped with the URL named; --resume finished the same run",
           stuck.fired)


def test_precompute_into_s3_through_throttled_reset_and_lost_writes_equals_a_run_without_faults(
        ray_local, tmp_path, s3_root, s3_server):
    build_planted_dataset(tmp_path / "data")
    local = planted_config(tmp_path / "data", str(tmp_path / "reference"), precompute={"rows_per_commit": 2})
    reference = EmbeddingCache.open(stage.run(validate_config(local)).datasets["train"].cache_url)
    raw = planted_config(tmp_path / "data", f"{s3_root}/store", precompute={"rows_per_commit": 2})
    (tmp_path / "pipeline.yaml").write_text(json.dumps(raw))
    with FaultProxy(upstream=s3_server["endpoint_url"]) as proxy:
        rules = [proxy.add_rule("PUT", "/shards/", "503", count=3), proxy.add_rule("PUT", "/shards/", "reset", count=1),
                 proxy.add_rule("PUT", "/commits/", "lost_response", count=2),
                 proxy.add_rule("PUT", "/commits/", "503", count=1),
                 proxy.add_rule("GET", "/commits/", "slow", count=1, delay=2),
                 proxy.add_rule("PUT", "manifest.json", "503", count=1)]
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "FSSPEC_S3_ENDPOINT_URL": proxy.url}  # Ray's workers too
        run = subprocess.run([sys.executable, "-m", "litpipe.cli", "precompute", str(tmp_path / "pipeline.yaml")],
                             env=env, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stderr[-3000:]
    assert [r.fired for r in rules] == [r.count for r in rules]
    cfg = validate_config(raw)
    assert_same_cache(EmbeddingCache.find(cfg.store.root, reference.manifest["encoder"], reference.manifest["dataset"]),
                      reference)
    for rule in rules:
        record("precompute (S3)", f"{rule.kind} on {rule.method} {rule.path}",
               "retried; the cache equals one written without faults", rule.fired)
