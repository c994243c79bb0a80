"""`litpipe cache ls|show|verify|rm`, driven through litpipe.cli.main like a user would."""

import numpy as np
import pyarrow as pa
import pytest

from litpipe.cli import main
from litpipe.store import EmbeddingCache
from litpipe.store.cache import shard_name

ENCODER = {"model": "tiny-vit", "pretrained": None, "output": "projected", "dim": 4, "spec": {}}
DATASET = {"format": "webdataset", "options": {}, "inputs": [{"url": "/data/c-0.tar", "size": 10, "mtime": 1.0}]}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(f"data:\n  train: {{format: webdataset, urls: x.tar}}\nstore:\n  root: {tmp_path / 'store'}\n")
    return str(path)


@pytest.fixture
def cache(config, tmp_path):
    cache = EmbeddingCache.open_or_create(str(tmp_path / "store"), ENCODER, DATASET)
    cache.commit_shard("/data/c-0.tar", pa.table({
        "key": ["a", "b", "c"], "captions": [["x"], ["y"], ["z"]],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(12, np.float32)), 4),
    }), [{"key": "d", "reason": "undecodable image"}])
    return cache


@pytest.mark.parametrize("action", ["ls", "show", "verify", "rm"])
def test_every_cache_command_has_help(action, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["cache", action, "--help"])
    assert exit.value.code == 0 and "usage: litpipe cache " + action in capsys.readouterr().out


def test_ls_lists_id_state_rows_encoder_and_dataset(cache, config, capsys):
    assert main(["cache", "ls", config]) == 0
    out = capsys.readouterr().out
    assert cache.id in out and "partial" in out and "tiny-vit" in out and "/data/c-0.tar" in out
    assert " 3 " in out


def test_show_prints_the_manifest_readably_by_id_prefix(cache, config, capsys):
    assert main(["cache", "show", cache.id[:6], config]) == 0
    out = capsys.readouterr().out
    assert f"cache {cache.id}" in out and "3 in 1 shard(s)" in out and "undecodable image" in out
    assert main(["cache", "show", cache.id, config, "--json"]) == 0
    assert '"format_version": 1' in capsys.readouterr().out


def test_verify_exits_nonzero_naming_the_broken_shard(cache, config, tmp_path, capsys):
    assert main(["cache", "verify", cache.id, config]) == 0
    assert "ok (1 shards, 3 rows)" in capsys.readouterr().out
    shard = tmp_path / "store" / cache.id / cache.shards()[0]["path"]
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["cache", "verify", cache.id, config]) == 1
    assert f"{shard}: " in capsys.readouterr().out


def test_rm_deletes_orphans_or_the_whole_cache(cache, config, tmp_path, capsys):
    shards = tmp_path / "store" / cache.id / "shards"
    (shards / f"{shard_name('/data/c-0.tar')}.0000.parquet").write_bytes(b"a crashed attempt")
    (shards / f"{shard_name('/data/c-1.tar')}.0000.parquet").write_bytes(b"maybe in flight")
    assert main(["cache", "rm", cache.id, config, "--orphans"]) == 0
    assert "removed 1 orphaned file(s); kept 1 whose input is not committed yet" in capsys.readouterr().out
    assert main(["cache", "rm", cache.id, config]) == 0
    assert main(["cache", "ls", config]) == 0
    assert "no caches under" in capsys.readouterr().out


def test_unknown_cache_id_is_a_user_error_pointing_at_ls(config, capsys):
    assert main(["cache", "show", "feedbeef", config]) == 2
    assert "feedbeef: no cache with this id" in capsys.readouterr().err
