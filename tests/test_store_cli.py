"""`litpipe cache ls|du|show|verify|export|rm`, driven through litpipe.cli.main like a user would."""

import json

import numpy as np
import pyarrow as pa
import pytest

from litpipe.store.commits import commit_part, finalize
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
    commit_part(cache, "/data/c-0.tar", pa.table({
        "key": ["a", "b", "c"], "captions": [["x"], ["y"], ["z"]],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(12, np.float32)), 4),
    }), [{"key": "d", "reason": "undecodable image"}])
    return cache


@pytest.mark.parametrize("action", ["ls", "du", "show", "verify", "export", "rm"])
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
    assert '"format_version": 3' in capsys.readouterr().out


def test_verify_says_a_partial_cache_is_partial_even_with_no_part(config, tmp_path, capsys):
    empty = EmbeddingCache.open_or_create(str(tmp_path / "store"), ENCODER, DATASET)
    assert main(["cache", "verify", empty.id, config]) == 0
    assert "PARTIAL, 0 part(s) committed so far" in capsys.readouterr().out


def test_verify_exits_nonzero_naming_the_broken_shard(cache, config, tmp_path, capsys):
    assert main(["cache", "verify", cache.id, config]) == 0
    assert "PARTIAL, 1 part(s) committed so far (3 rows), each intact" in capsys.readouterr().out
    finalize(cache)
    assert main(["cache", "verify", cache.id, config]) == 0
    assert "ok (1 parts, 3 rows)" in capsys.readouterr().out
    shard = tmp_path / "store" / cache.id / cache.parts()[0]["path"]
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


def test_ls_json_and_du_count_what_caches_share_after_a_grown_dataset_adopted_its_shards(config, tmp_path, capsys):
    from litpipe.store.sharing import adopt_from_other_caches

    inputs = [{"url": f"/data/s-{i}.tar", "size": 10 + i, "mtime": 1.0} for i in range(3)]
    v1 = {**DATASET, "inputs": inputs[:2]}
    v2 = {**DATASET, "inputs": inputs}  # v1 plus one shard
    other_encoder = {**ENCODER, "weights_sha256": "f" * 64}
    made = {}
    for name, encoder, dataset in (("v1", ENCODER, v1), ("v2", ENCODER, v2), ("v2-other", other_encoder, v2)):
        cache = EmbeddingCache.open_or_create(str(tmp_path / "store"), encoder, dataset, dataset_name=name)
        adopted = adopt_from_other_caches(cache, [i["url"] for i in dataset["inputs"]])
        assert sorted(adopted) == (["/data/s-0.tar", "/data/s-1.tar"] if name == "v2" else [])
        for i, entry in enumerate(dataset["inputs"]):
            if entry["url"] not in adopted:
                commit_part(cache, entry["url"], pa.table({
                    "key": [f"{entry['url']}/{j}" for j in range(i + 1)], "captions": [["x"]] * (i + 1),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4 * (i + 1), np.float32)), 4),
                }), [{"key": f"{entry['url']}/bad", "reason": "undecodable image"}])
        if name != "v2-other":
            finalize(cache)
        made[name] = cache
    assert main(["cache", "ls", config, "--json"]) == 0
    listed = {e["dataset"]: e for e in json.loads(capsys.readouterr().out)}
    assert {k: (e["state"], e["rows"], e["errors"], e["parts"], e["parts_shared"]) for k, e in listed.items()} == {
        "v1": ("complete", 3, 2, 2, 2), "v2": ("complete", 6, 3, 3, 2), "v2-other": ("partial", 6, 3, 3, 0)}
    assert listed["v2"]["bytes"] == sum(r["bytes"] for r in made["v2"].parts()) > listed["v1"]["bytes"]
    assert listed["v2-other"]["encoder"]["weights_sha256"] == "f" * 12
    assert main(["cache", "du", config, "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)
    assert sorted((g["caches"], g["rows"]) for g in groups) == [(1, 6), (2, 6)]  # a shared file counts once
    both = next(g for g in groups if g["caches"] == 2)
    folder = {name: sum(f.stat().st_size for f in (tmp_path / "store" / made[name].id).rglob("*") if f.is_file())
              for name in ("v1", "v2")}
    assert both["bytes"] == folder["v1"] + folder["v2"]  # on disk, each file once: in the folder of the cache that wrote it
    assert both["rm_frees"] == {made["v1"].id: folder["v1"] - listed["v1"]["bytes"],  # v1's data files are v2's too
                                made["v2"].id: folder["v2"]}
    assert main(["cache", "ls", config]) == 0
    table = capsys.readouterr().out
    assert "   2/3   " in table and "v2-other (webdataset, /data/s-0.tar +2)" in table


def test_ls_and_du_count_every_byte_on_disk_token_rows_included(cache, config, tmp_path, capsys):
    finalize(cache)
    rows = tmp_path / "store" / cache.id / "tokens" / "0123456789abcdef"
    rows.mkdir(parents=True)
    (rows / "part.parquet").write_bytes(b"t" * 5000)  # stands for a token cache's rows beside the vectors
    on_disk = sum(f.stat().st_size for f in (tmp_path / "store").rglob("*") if f.is_file())
    assert main(["cache", "ls", config, "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["disk_bytes"] == entry["rm_frees"] == on_disk > entry["bytes"] + 5000
    assert main(["cache", "du", config, "--json"]) == 0
    (group,) = json.loads(capsys.readouterr().out)
    assert group["bytes"] == on_disk and group["rm_frees"] == {cache.id: on_disk}
