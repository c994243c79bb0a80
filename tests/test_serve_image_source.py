"""serve/image_source.py: a cached key leads back to its image bytes in a Parquet or folder source."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.store.commits import commit_part, finalize
from litpipe.config import DatasetConfig
from litpipe.serve.image_source import ImageFetcher
from litpipe.store import EmbeddingCache

ENCODER_FP = {"model": "none", "dim": 2}


def _cache_with(tmp_path, dataset, inputs_and_keys):
    cache = EmbeddingCache.open_or_create(str(tmp_path / "store"), ENCODER_FP, {"dataset": str(tmp_path)})
    for url, keys in inputs_and_keys:
        commit_part(cache, url, pa.table({
            "key": keys, "captions": [["c"]] * len(keys),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 2 * len(keys), pa.float32()), 2),
        }))
    finalize(cache)
    return cache


def test_keys_from_two_parquet_shards_fetch_their_own_bytes(tmp_path):
    for part in (0, 1):
        pq.write_table(pa.table({"key": [f"k{part}{i}" for i in range(3)], "jpg": [f"img{part}{i}".encode() for i in range(3)],
                                 "caption": ["x"] * 3}), tmp_path / f"part-{part}.parquet")
    dataset = DatasetConfig(format="parquet", urls=str(tmp_path / "part-*.parquet"))
    cache = _cache_with(tmp_path, dataset, [(str(tmp_path / f"part-{p}.parquet"), [f"k{p}{i}" for i in range(3)]) for p in (0, 1)])
    assert ImageFetcher(cache, dataset).fetch(["k12", "k00"]) == {"k12": b"img12", "k00": b"img00"}


def test_parquet_without_a_key_column_uses_stem_and_row(tmp_path):
    pq.write_table(pa.table({"image": [b"a", b"b"], "caption": ["x", "y"]}), tmp_path / "shard.parquet")
    dataset = DatasetConfig(format="parquet", urls=str(tmp_path / "shard.parquet"))
    cache = _cache_with(tmp_path, dataset, [(str(tmp_path / "shard.parquet"), ["shard/0", "shard/1"])])
    assert ImageFetcher(cache, dataset).fetch(["shard/1"]) == {"shard/1": b"b"}


def test_folder_rows_fetch_the_image_file_by_its_path_key(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    (tmp_path / "images" / "sub" / "cat.png").write_bytes(b"cat-bytes")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"path": "sub/cat.png", "caption": "a cat"}) + "\n")
    dataset = DatasetConfig(format="folder", urls=str(tmp_path / "images"), captions_file=str(captions))
    cache = _cache_with(tmp_path, dataset, [(f"{captions}#rows=0-1", ["sub/cat"])])
    assert ImageFetcher(cache, dataset).fetch(["sub/cat"]) == {"sub/cat": b"cat-bytes"}
