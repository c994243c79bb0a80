"""The precompute job end to end on a real local Ray: parity, bad input, reuse, resume mid-shard, formats.

Kills at many more points, and what they leave, are tests/faults/."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from litpipe.store.maintenance import verify
from litpipe.config import validate_config
from litpipe.errors import UserError
from litpipe.precompute import stage
from litpipe.precompute.job import worker_runtime_env
from litpipe.images import decode_image
from litpipe.store.cache import CacheError, EmbeddingCache, list_caches
from litpipe.store.sharing import remove_part
from litpipe.models.image_encoder import load_encoder
from precompute_samples import (GOOD_RGB, ODD_MODES, PLANTED_ERRORS, build_planted_dataset, cache_rows, image_bytes,
                                planted_config, sample_members, tiny_config, write_tar)

@pytest.fixture(scope="module")
def planted(ray_local, tmp_path_factory):
    base = tmp_path_factory.mktemp("precompute")
    good = build_planted_dataset(base / "data")
    cfg = validate_config(planted_config(base / "data", str(base / "store")))
    summary = stage.run(cfg).datasets["train"]
    return {"base": base, "good": good, "cfg": cfg, "summary": summary,
            "cache": EmbeddingCache.open(summary.cache_url)}


def test_planted_bad_inputs_are_recorded_and_every_good_sample_kept(planted):
    cache, summary = planted["cache"], planted["summary"]
    assert cache.complete
    assert sorted(cache_rows(cache)) == sorted(planted["good"])
    errors = cache.errors()
    assert len(errors) == PLANTED_ERRORS == summary.skipped == cache.manifest["num_errors"]
    reasons = {e["key"]: e["reason"] for e in errors}
    assert reasons["bad/zero-byte"].startswith("empty image")
    assert reasons["bad/truncated"].startswith("truncated image")
    assert reasons["bad/undecodable"].startswith("undecodable image")
    assert reasons["bad/bomb"].startswith("decompression bomb")
    assert cache_rows(cache)["odd/no-caption"]["captions"] == [] and summary.uncaptioned == 1
    assert reasons["cut/2"].startswith("truncated shard")
    assert reasons["plain/2"] == f"duplicate key: first in {planted['base'] / 'data' / 'train-000000.tar'}"
    assert summary.skipped_by_reason["duplicate key"] == 1
    assert [e["input"].endswith("train-000003.tar") for e in errors if e["reason"].startswith("unreadable shard")] == [True]
    assert summary.embedded == len(planted["good"])


def test_cached_embeddings_equal_open_clip_encode_image_of_the_same_images(planted):
    """Tolerance: float16 storage, |cached - direct| <= 1e-3 * |direct| + 1e-3 * max|direct|."""
    rows = cache_rows(planted["cache"])
    encoder = load_encoder(planted["cfg"].encoder, device="cpu")
    images = [Image.open(io.BytesIO(image_bytes(i))).convert("RGB") for i in range(len(GOOD_RGB))]
    images += [decode_image(data, 10**6) for data in ODD_MODES.values()]
    with torch.no_grad():
        direct = encoder.model.encode_image(torch.stack([encoder.preprocess(im) for im in images])).double().numpy()
    cached = np.array([rows[key]["embedding"] for key in GOOD_RGB + list(ODD_MODES)], dtype=np.float64)
    np.testing.assert_allclose(cached, direct, rtol=1e-3, atol=1e-3 * np.abs(direct).max())


def test_captions_labels_and_metadata_pass_through(planted):
    rows = cache_rows(planted["cache"])
    assert rows["plain/3"]["captions"] == ["caption 3", "alt 3"] and rows["plain/3"]["label"] == 3
    assert rows["odd/grey"].get("label") is None and rows["odd/grey"]["captions"] == ["odd odd/grey"]
    assert json.loads(rows["plain/0"]["metadata"]) == {"source": "test"}


def test_second_run_with_same_encoder_and_data_encodes_nothing(planted):
    again = stage.run(planted["cfg"])
    result = again.datasets["train"]
    assert result.reused and result.embedded == 0 and result.inputs_processed == 0
    assert result.cache_id == planted["cache"].id
    assert "nothing encoded" in again.report[0]


def test_the_datasets_of_a_run_share_one_encoder_actor_and_a_later_one_adopts_what_an_earlier_one_embedded(
        planted, tmp_path):
    """`first` and `second` go through one job (one actor loads the encoder once); `both` reads
    their shards, so it waits for them and adopts both shards instead of encoding them again."""
    data = planted["base"] / "data"
    raw = planted_config(data, str(tmp_path / "store"), train={"dataset": "first"})
    raw["data"] = {"first": {"format": "webdataset", "urls": str(data / "train-000000.tar")},
                   "second": {"format": "webdataset", "urls": str(data / "train-000001.tar")},
                   "both": {"format": "webdataset", "urls": str(data / "train-{000000..000001}.tar")}}
    summary = stage.run(validate_config(raw)).datasets
    first, second, both = summary["first"], summary["second"], summary["both"]
    assert len(first.encoded_by) == 1 and second.encoded_by == first.encoded_by
    assert (both.inputs_reused, both.embedded, both.encoded_by) == (2, 0, [])
    assert both.reused_from == sorted([first.cache_id, second.cache_id])
    caches = {name: cache_rows(EmbeddingCache.open(result.cache_url)) for name, result in summary.items()}
    assert caches["both"].keys() == caches["first"].keys() | caches["second"].keys()
    reference = cache_rows(planted["cache"])
    assert all(row["embedding"].tobytes() == reference[key]["embedding"].tobytes() for key, row in caches["both"].items())


def test_a_key_repeated_across_input_shards_is_kept_in_its_first_shard_only_by_every_actor_reader_and_resume(
        ray_local, tmp_path):
    """Merged crawls repeat keys across shards. Two actors commit parts in any order (Ray Data gives
    them work as they are ready: one may take every part); the first copy
    in input order stays, each later one is skipped naming that shard, whichever order the parts were
    committed in (a part taken out and encoded again commits last), and verify, the reader and the
    export see each key once. A cache adopting only a later shard keeps that shard's copy."""
    from litpipe.store.export import export_cache
    from litpipe.store.reader import StreamingReader, load_all

    shards = {0: ["a", "b", "c", "d"], 1: ["e", "a", "f", "b"], 2: ["a", "g", "c", "h"]}
    for shard, keys in shards.items():
        members = [m for i, key in enumerate(keys) for m in sample_members(key, image_bytes(10 * shard + i), f"{key} in {shard}")]
        write_tar(tmp_path / f"in-{shard:06d}.tar", [(name, "h in 2, café".encode("latin-1")) if name == "h.txt" else (name, data)
                                                     for name, data in members])
    urls = {shard: str(tmp_path / f"in-{shard:06d}.tar") for shard in shards}
    raw = tiny_config({"all": {"format": "webdataset", "urls": str(tmp_path / "in-*.tar")},
                       "later": {"format": "webdataset", "urls": urls[1]}}, str(tmp_path / "store"),
                      train={"dataset": "all"})
    raw["precompute"].update(rows_per_commit=2, encoder_actors=2, batch_size=2)
    cfg = validate_config(raw)
    summary = stage.run(cfg, ["all"]).datasets["all"]
    cache = EmbeddingCache.open(summary.cache_url)
    first_copies = {"a": 0, "b": 0, "c": 0, "d": 0, "e": 1, "f": 1, "g": 2, "h": 2}
    rows = cache_rows(cache)  # asserts each key once
    assert {key: row["captions"] for key, row in rows.items()} == {**{k: [f"{k} in {s}"] for k, s in first_copies.items()},
                                                                   "h": ["h in 2, café"]}
    assert summary.legacy_captions == 1 and "1 caption(s) were not UTF-8" in summary.report_line()
    assert not set(summary.decoded_by) & set(summary.encoded_by)  # read tasks decode apart from the actors
    expected_errors = sorted([("a", urls[1], urls[0]), ("b", urls[1], urls[0]), ("a", urls[2], urls[0]), ("c", urls[2], urls[0])])
    assert sorted((e["key"], e["input"], e["reason"].split("first in ")[1]) for e in cache.errors()) == expected_errors
    assert summary.skipped_by_reason == {"duplicate key": 4} and summary.rows_in_cache == 8
    assert verify(cache) == []
    assert sorted(load_all(cache).keys) == sorted(first_copies)
    reader = StreamingReader(cache, batch_size=8, shuffle=False)
    assert sorted(key for batch in reader for key in batch.keys) == sorted(first_copies)
    export_cache(cache, str(tmp_path / "export"), "arrow")
    exported = [key for f in sorted((tmp_path / "export").rglob("*.parquet")) for key in pq.read_table(f)["key"].to_pylist()]
    assert sorted(exported) == sorted(first_copies)

    # Resume: the part of in-000000 holding "a" goes back out and is committed after the others.
    (part,) = [r["name"] for r in cache.parts() if r["input"] == urls[0] and r["part"] == 0]
    remove_part(cache, part)
    again = stage.run(cfg, ["all"]).datasets["all"]
    assert again.embedded == 2 and again.skipped == 0  # the first copies of a and b: nothing of them dropped
    resumed = EmbeddingCache.open(again.cache_url)
    assert {k: r["embedding"].tobytes() for k, r in cache_rows(resumed).items()} == \
        {k: r["embedding"].tobytes() for k, r in rows.items()}
    assert sorted((e["key"], e["input"], e["reason"]) for e in resumed.errors()) == \
        sorted((e["key"], e["input"], e["reason"]) for e in cache.errors())

    # A dataset of in-000001 alone: its "a" and "b" are first there; the rewritten part is not adopted.
    later = stage.run(cfg, ["later"]).datasets["later"]
    assert later.inputs_reused == 0 and later.embedded == 4 and later.skipped == 0
    assert sorted(cache_rows(EmbeddingCache.open(later.cache_url))) == ["a", "b", "e", "f"]


def test_the_driver_never_builds_the_image_tower_and_names_the_cache_as_the_tower_does(ray_local, tmp_path, monkeypatch):
    """A ViT-bigG is about 10 GB: a Ray worker builds the tower to fingerprint it, then exits."""
    import open_clip

    write_tar(tmp_path / "in-000000.tar", sample_members("a", image_bytes(1), "one"))
    cfg = validate_config(tiny_config({"train": {"format": "webdataset", "urls": str(tmp_path / "in-*.tar")}},
                                      str(tmp_path / "store")))
    fingerprint = load_encoder(cfg.encoder, device="cpu").fingerprint

    def refuse(*args, **kwargs):
        raise AssertionError("the driver built the image tower")

    for factory in ("create_model", "create_model_and_transforms"):  # Ray workers import open_clip afresh
        monkeypatch.setattr(open_clip, factory, refuse)
    summary = stage.run(cfg).datasets["train"]
    assert summary.complete and summary.embedded == 1
    assert EmbeddingCache.open(summary.cache_url).manifest["encoder"] == json.loads(json.dumps(fingerprint))


def test_encoder_actors_that_would_take_every_cpu_stop_the_run_naming_the_key(ray_local, tmp_path):
    """Each actor holds a CPU: with none left the read tasks would wait forever, and the job with them."""
    write_tar(tmp_path / "in-000000.tar", sample_members("a", image_bytes(1), "one"))
    raw = tiny_config({"train": {"format": "webdataset", "urls": str(tmp_path / "in-*.tar")}}, str(tmp_path / "store"))
    raw["precompute"]["encoder_actors"] = int(ray_local.cluster_resources()["CPU"])
    with pytest.raises(UserError, match=r"precompute.encoder_actors \(3\) takes every CPU of the Ray cluster \(3\)"):
        stage.run(validate_config(raw))


def test_parquet_and_folder_datasets_are_precomputed_into_an_s3_store(ray_local, tmp_path, s3_root):
    table = pa.table({"image": [{"bytes": image_bytes(i), "path": None} for i in range(3)] + [{"bytes": b"bad", "path": None}],
                      "text": ["p0", "p1", "p2", "p3"], "label": [0, 1, 2, 3]})
    pq.write_table(table, tmp_path / "part-0.parquet")
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"f{i}.png").write_bytes(image_bytes(20 + i))
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"path": f"f{i}.png", "caption": f"folder {i}"}) + "\n"
                                                     for i in range(3)))
    data = {"pq": {"format": "parquet", "urls": str(tmp_path / "*.parquet")},
            "folder": {"format": "folder", "urls": str(tmp_path / "images"), "captions_file": str(tmp_path / "captions.jsonl"),
                       "shard_rows": 2}}
    summary = stage.run(validate_config(tiny_config(data, s3_root, train={"dataset": "pq"}))).datasets
    pq_cache, folder_cache = (EmbeddingCache.open(summary[n].cache_url) for n in ("pq", "folder"))
    assert pq_cache.url.startswith("s3://") and pq_cache.complete and folder_cache.complete
    pq_rows, folder_rows = cache_rows(pq_cache), cache_rows(folder_cache)
    assert {k: (r["captions"], r["label"]) for k, r in pq_rows.items()} == {f"part-0/{i}": ([f"p{i}"], i) for i in range(3)}
    assert [e["key"] for e in pq_cache.errors()] == ["part-0/3"]
    assert {k: r["captions"] for k, r in folder_rows.items()} == {f"f{i}": [f"folder {i}"] for i in range(3)}
    assert len(folder_cache.parts()) == 2


def test_shards_cut_into_parts_commit_each_part_once_and_resume_mid_shard_bit_identically(planted, planted_in_parts,
                                                                                         tmp_path):
    """rows_per_commit=2: every shard is several parts; a cache holding only the first part of a
    shard is finished by the next run, bit for bit as an uninterrupted run writes it."""
    base, reference = planted_in_parts["base"], planted_in_parts["cache"]
    assert max(r["part"] for r in reference.parts()) >= 2 and reference.rows_per_commit == 2
    assert list(cache_rows(reference)) == list(cache_rows(planted["cache"]))  # same keys, same order as one part a shard

    # What a kill right after part 0 of a multi-part shard commits leaves: the parts after it taken
    # out again (tests/faults/ kills real runs at many such points).
    shutil.copytree(base / "reference" / "store", tmp_path / "parts-cut")
    cfg = validate_config(planted_config(base / "data", str(tmp_path / "parts-cut"), precompute={"rows_per_commit": 2}))
    partial = EmbeddingCache.open(reference.id, root=cfg.store.root)
    cut = next(r["input"] for r in reference.parts() if r["part"] == 2)
    for record in reference.parts():
        if record["input"] == cut and record["part"] >= 1:
            remove_part(partial, record["name"])
    partial = EmbeddingCache.open(partial.url)
    assert not partial.complete and cut not in partial.committed_inputs() and partial.committed_parts()[cut] == {0}
    resumed = EmbeddingCache.open(stage.run(cfg).datasets["train"].cache_url)
    got, want = cache_rows(resumed), cache_rows(reference)
    assert list(got) == list(want)
    assert all(got[k]["embedding"].tobytes() == want[k]["embedding"].tobytes() for k in want)
    assert [(r["input"], r["part"], r["rows"]) for r in resumed.parts()] == \
        [(r["input"], r["part"], r["rows"]) for r in reference.parts()]


def test_a_misnamed_column_stops_the_run_before_any_commit_with_the_columns_named(ray_local, tmp_path, capsys):
    from litpipe.cli import main

    pq.write_table(pa.table({"image": [image_bytes(0)], "text": ["a"], "label": [0]}), tmp_path / "part-0.parquet")
    raw = tiny_config({"pq": {"format": "parquet", "urls": str(tmp_path / "*.parquet"), "image_column": "img"}},
                      str(tmp_path / "store"), train={"dataset": "pq"})
    (tmp_path / "pipeline.yaml").write_text(json.dumps(raw))
    assert main(["precompute", str(tmp_path / "pipeline.yaml")]) == 2
    err = capsys.readouterr().err
    assert "no column `img` (data.*.image_column); columns are image, text, label" in err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("commits"))


@pytest.mark.parametrize("problem", ["no credentials", "no server"])
def test_an_s3_store_that_cannot_be_used_is_named_with_the_fix(tmp_path, s3_server, problem):
    build_planted_dataset(tmp_path / "data")
    raw = planted_config(tmp_path / "data", "s3://litpipe-test/unusable")
    (tmp_path / "pipeline.yaml").write_text(json.dumps(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3"))}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=s3_server["endpoint_url"])
    if problem == "no server":  # good credentials, but a port nobody listens on
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env.update({k: v for k, v in s3_server["env"].items() if k.startswith("AWS_")},
                   AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "-m", "litpipe.cli", "precompute", str(tmp_path / "pipeline.yaml")],
                            capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    expected = {"no credentials": "no usable credentials were found", "no server": "cannot connect to the store"}[problem]
    assert f"store.root: s3://litpipe-test/unusable: {expected}" in result.stderr
    assert ("AWS_ACCESS_KEY_ID" if problem == "no credentials" else "AWS_ENDPOINT_URL") in result.stderr


ON_THREE_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from litpipe.config import validate_config
from litpipe.precompute import stage
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
for _ in range(2):
    cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
raw = json.loads(sys.argv[1])
raw["ray"] = {"address": cluster.address}
summary = stage.run(validate_config(raw)).datasets["train"]
nodes = len([n for n in ray.nodes() if n["Alive"]])
print(json.dumps({"cache_url": summary.cache_url, "nodes": nodes}))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.long
def test_a_three_node_ray_cluster_writes_the_same_cache_as_one_node(planted, tmp_path):
    raw = planted_config(planted["base"] / "data", str(tmp_path / "store"))
    raw["precompute"]["encoder_actors"] = 2
    child = subprocess.run([sys.executable, "-c", ON_THREE_NODES, json.dumps(raw)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["nodes"] == 3
    cache, reference = EmbeddingCache.open(result["cache_url"]), planted["cache"]
    assert cache.complete and cache.id == reference.id
    got, want = cache_rows(cache), cache_rows(reference)
    assert list(got) == list(want)
    assert all(got[k]["embedding"].tobytes() == want[k]["embedding"].tobytes() for k in want)
    assert sorted(map(json.dumps, cache.errors())) == sorted(map(json.dumps, reference.errors()))


def test_jpegs_decoded_by_the_encoder_give_the_cache_the_cpu_decoder_gives(ray_local, tmp_path):
    from test_precompute_decode import _photo_jpeg

    images = {f"j/{i}": _photo_jpeg(i, size=(80 + 8 * i, 60)) for i in range(5)}
    images["j/cmyk"] = _photo_jpeg(9, mode="CMYK")
    images["j/cut"] = images["j/0"][:300]
    (tmp_path / "data").mkdir()
    write_tar(tmp_path / "data" / "jpg-000000.tar",
              [m for key, data in images.items() for m in sample_members(key, data, f"photo {key}", ext="jpg")])
    caches = {}
    for decode in ("cpu", "device"):
        raw = tiny_config({"train": {"format": "webdataset", "urls": str(tmp_path / "data" / "*.tar")}},
                          str(tmp_path / f"store-{decode}"))
        raw["encoder"].update(jpeg_decode=decode, preprocess="tensor")
        caches[decode] = EmbeddingCache.open(stage.run(validate_config(raw)).datasets["train"].cache_url)
    cpu, device = cache_rows(caches["cpu"]), cache_rows(caches["device"])
    assert list(device) == list(cpu) == [k for k in images if k != "j/cut"]
    assert caches["device"].errors() == caches["cpu"].errors() and caches["cpu"].errors()[0]["key"] == "j/cut"
    np.testing.assert_allclose(np.stack([device[k]["embedding"] for k in cpu]),
                               np.stack([cpu[k]["embedding"] for k in cpu]), atol=2e-2)


@pytest.mark.long
def test_s3_faults_are_retried_and_a_shard_that_stays_unreadable_fails_without_a_commit(planted, tmp_path, s3_root):
    """Real faults between the job and a real S3 protocol server: throttling and a reset connection
    are retried and leave no trace; a shard whose reads keep failing is committed by no one, counted
    as failed (exit code 75: rerun to finish), never recorded as bad data, and the rerun finishes it."""
    from fault_proxy import FaultProxy

    fs = fsspec.filesystem("s3")
    for tar in sorted((planted["base"] / "data").glob("*.tar")):
        fs.pipe_file(f"{s3_root}/data/{tar.name}", tar.read_bytes())
    raw = planted_config(planted["base"] / "data", str(tmp_path / "store"), precompute={"read_retries": 1})
    raw["data"]["train"]["urls"] = f"{s3_root}/data/train-*.tar"
    (tmp_path / "pipeline.yaml").write_text(json.dumps(raw))
    with FaultProxy(upstream=os.environ["AWS_ENDPOINT_URL"]) as proxy:
        # botocore's own retries off: s3fs's retries and Ray's task retries carry the test, and keep it short
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url, "FSSPEC_S3_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"}
        throttled = proxy.add_rule("GET", "train-000000.tar", "503", count=2)
        reset = proxy.add_rule("GET", "train-000001.tar", "reset", count=1)
        broken = proxy.add_rule("GET", "train-000002.tar", "503", count=10_000)
        command = [sys.executable, "-m", "litpipe.cli", "precompute", str(tmp_path / "pipeline.yaml")]
        first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert first.returncode == 75, first.stderr[-3000:]
        assert "1 input shard(s) failed after retries and were not committed" in first.stderr
        assert throttled.fired == 2 and reset.fired == 1 and broken.fired > 3
        cache = next(c for c in list_caches(str(tmp_path / "store")))
        assert not cache.complete and not any(e["input"].endswith("train-000002.tar") for e in cache.errors())
        assert {r["input"].rsplit("/", 1)[1] for r in cache.parts()} == {"train-000000.tar", "train-000001.tar",
                                                                         "train-000003.tar"}
    # The rerun, faults gone: in this process, whose Ray workers reach the S3 server directly.
    second = stage.run(validate_config(raw))
    second.raise_if_incomplete()
    assert second.datasets["train"].inputs_processed == 1  # the failed shard alone
    cache = EmbeddingCache.open(cache.url)
    got, want = cache_rows(cache), cache_rows(planted["cache"])
    assert cache.complete and list(got) == list(want)
    assert all(got[k]["embedding"].tobytes() == want[k]["embedding"].tobytes() for k in want)
    # A duplicate's reason names the shard of its first copy: here on S3, there on disk.
    assert [(e["key"], e["reason"].rsplit("/", 1)[-1]) for e in cache.errors()] == \
        [(e["key"], e["reason"].rsplit("/", 1)[-1]) for e in planted["cache"].errors()]


def test_a_bit_flipped_in_a_shard_at_rest_fails_every_read_naming_the_file_and_rm_shard_then_precompute_mends_it(
        planted, tmp_path, capsys):
    import yaml

    from litpipe.cli import main
    from litpipe.store import StreamingReader, load_all

    shutil.copytree(planted["base"] / "store", tmp_path / "store")
    raw = planted_config(planted["base"] / "data", str(tmp_path / "store"))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    cache = EmbeddingCache.open(planted["cache"].id, root=str(tmp_path / "store"))
    record = cache.parts()[0]
    path = Path(cache.file_path(record))
    data = bytearray(path.read_bytes())
    at = data.index(cache_rows(cache)["plain/2"]["embedding"].tobytes()) + 3
    data[at] ^= 0x04  # one bit of one stored vector: the file still parses, and no decoder would notice
    path.write_bytes(data)

    named = f"{path}: corrupt data in a committed shard .*CRC.*litpipe cache rm {cache.id} --part {record['name']}`"
    with pytest.raises(CacheError, match=named):
        load_all(cache)
    with pytest.raises(CacheError, match=named):
        list(StreamingReader(cache, batch_size=4))
    assert any(p.startswith(f"{path}: sha256 differs") for p in verify(cache))
    assert main(["cache", "rm", cache.id, str(tmp_path / "pipeline.yaml"), "--part", record["name"]]) == 0
    assert f"part {record['name']} taken out" in capsys.readouterr().out

    mended = stage.run(validate_config(raw)).datasets["train"]
    assert mended.inputs_processed == 1 and mended.embedded == len(GOOD_RGB)
    cache = EmbeddingCache.open(mended.cache_url)
    assert verify(cache) == []
    got, want = cache_rows(cache), cache_rows(planted["cache"])
    assert list(got) == list(want) and all(got[k]["embedding"].tobytes() == want[k]["embedding"].tobytes() for k in want)


def test_a_grown_dataset_encodes_only_its_new_shards_and_removal_keeps_what_another_cache_names(ray_local, tmp_path):
    from litpipe.store.sharing import collect_garbage, remove_cache

    data = tmp_path / "data"
    data.mkdir()
    for s in range(3):
        write_tar(data / f"part-{s:06d}.tar", [m for i in range(4 + s)
                                               for m in sample_members(f"{s}/{i}", image_bytes(10 * s + i), f"c {s} {i}")])
    v1 = {"format": "webdataset", "urls": str(data / "part-{000000..000001}.tar")}
    v2 = {"format": "webdataset", "urls": str(data / "part-{000000..000002}.tar")}
    root = str(tmp_path / "store")
    def config(name, dataset, store):
        return validate_config(tiny_config({name: dataset}, store, train={"dataset": name}))

    first = stage.run(config("v1", v1, root)).datasets["v1"]
    grown = stage.run(config("v2", v2, root))
    second = grown.datasets["v2"]
    assert (first.embedded, second.embedded, second.inputs_processed, second.inputs_reused) == (9, 6, 1, 2)
    assert second.reused_from == [first.cache_id] and "2 input shard(s) adopted from cache(s)" in grown.report[0]
    alone = stage.run(config("v2", v2, str(tmp_path / "alone"))).datasets["v2"]
    view, reference = EmbeddingCache.open(second.cache_url), EmbeddingCache.open(alone.cache_url)
    assert view.id == reference.id and view.complete
    got, want = cache_rows(view), cache_rows(reference)  # the view reads the same rows as a cache built alone
    assert sorted(got) == sorted(want) and all(got[k]["embedding"].tobytes() == want[k]["embedding"].tobytes() for k in want)

    plan = remove_cache(EmbeddingCache.open(first.cache_url), dry_run=True)
    assert plan["deleted"] == [] and len(plan["kept"]) == 2  # both of v1's files are v2's too
    remove_cache(EmbeddingCache.open(first.cache_url))
    assert [c.id for c in list_caches(root)] == [view.id] and verify(view) == []
    assert sorted(cache_rows(view)) == sorted(want)
    plan = remove_cache(view)  # now the last cache naming v1's files: they go too
    assert len(plan["deleted"]) == 3 and plan["kept"] == []
    assert list_caches(root) == [] and collect_garbage(root) == []
    assert not list(Path(root).rglob("*.parquet"))


def test_the_encoder_actor_keeps_the_memory_a_forward_frees(ray_local):
    """With glibc's defaults every freed block above 32 MiB goes back to the kernel, and the next
    forward faults fresh zeroed pages in (13% of a CPU ViT-B-32 forward): an actor made with the
    runtime_env of the job's workers keeps them, and a plain actor shows the difference is real."""
    import ray

    if "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        pytest.skip("transparent huge pages for every mapping: large blocks fault in 2 MiB at a time either way")

    @ray.remote(num_cpus=0)
    class Forwards:
        def page_faults(self) -> int:
            import resource

            def forwards():  # a large forward's activation each: 100 MiB, written, freed (no torch to import)
                for _ in range(10):
                    bytearray(100 << 20)

            forwards()  # the heap grows to its working size
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            forwards()
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    kept = ray.get(Forwards.options(runtime_env=worker_runtime_env()).remote().page_faults.remote())
    plain = ray.get(Forwards.remote().page_faults.remote())
    pages = (100 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert plain > 8 * pages  # every forward faulted its block in again
    assert kept < pages / 10


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
@pytest.mark.parametrize("cpu_encoder", [True, False])
def test_decoding_beside_a_cpu_encoder_takes_only_idle_cpu(tmp_path, cpu_encoder):
    """A CPU forward uses every core, and a decode that preempts one of its threads stalls them
    all: beside a CPU encoder a read task runs at SCHED_IDLE; beside a GPU encoder it competes."""
    import threading

    import pyarrow as pa

    from litpipe.precompute.read import read_parts

    write_tar(tmp_path / "in-000000.tar", sample_members("a", image_bytes(1), "one"))
    cfg = validate_config(tiny_config({"train": {"format": "webdataset", "urls": str(tmp_path / "in-*.tar")}},
                                      str(tmp_path / "store")))
    pixels = load_encoder(cfg.encoder, device="cpu").pixels.cpu_step
    seen = {}

    def read_in_a_thread_of_its_own():  # the scheduling class is per thread: the test's own stays as it is
        row = pa.table({"dataset": ["train"], "input": [str(tmp_path / "in-000000.tar")], "skip": [[]]})
        parts = list(read_parts(row, cfg.data, {"train": None}, pixels, 10_000_000, False, yield_cpu=cpu_encoder,
                                      read_retries=0))
        seen["policy"], seen["parts"] = os.sched_getscheduler(0), len(parts)

    thread = threading.Thread(target=read_in_a_thread_of_its_own)
    thread.start()
    thread.join()
    assert seen == {"policy": os.SCHED_IDLE if cpu_encoder else os.SCHED_OTHER, "parts": 1}
