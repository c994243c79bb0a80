"""`litpipe cache export`: a cache in clip-retrieval's npy layout and as vector Parquet, read back by the tools
that consume them (embedding-reader, Hugging Face datasets, LanceDB), every vector compared."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from litpipe.store import EmbeddingCache, load_all
from litpipe.store.export import export_cache

DIM = 12
SHARDS = {"a.tar": 20, "b.tar": 13, "c.tar": 0}  # rows per input shard; c's only sample was bad


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A float16 cache of three shards (one with labels, one without, one empty) in row groups of 7."""
    root = tmp_path_factory.mktemp("export-store")
    cache = EmbeddingCache.open_or_create(str(root), {"model": "test", "dim": DIM}, {"inputs": list(SHARDS)},
                                          embedding_dtype="float16", row_group_rows=7)
    rng = np.random.default_rng(0)
    for shard, rows in SHARDS.items():
        columns = {"key": pa.array([f"{shard}/{i}" for i in range(rows)], pa.string()),
                   "captions": pa.array([[f"caption {i} of {shard}"] * (i % 3) for i in range(rows)], pa.list_(pa.string())),
                   "embedding": pa.FixedSizeListArray.from_arrays(rng.normal(size=rows * DIM).astype(np.float32), DIM),
                   "metadata": pa.array([f'{{"i": {i}}}' for i in range(rows)], pa.string())}
        if shard == "a.tar":
            columns["label"] = [i % 4 for i in range(rows)]
        errors = [{"key": f"{shard}/bad", "reason": "undecodable image"}] if rows == 0 else []
        cache.commit_shard(shard, pa.table(columns), errors)
    cache.finalize()
    return cache


def expected(cache) -> dict:
    contents = load_all(cache)
    labels = contents.labels.tolist()
    return {key: (vector, captions, label) for key, vector, captions, label
            in zip(contents.keys, contents.embeddings.numpy(), contents.captions, labels)}


def test_npy_export_reads_back_in_embedding_reader_row_aligned_with_its_metadata(cache, tmp_path):
    from embedding_reader import EmbeddingReader

    summary = export_cache(cache, str(tmp_path / "npy"), "npy")
    assert summary["dtype"] == "float16" and summary["rows"] == 33 and len(summary["files"]) == 3
    assert np.load(summary["files"][0]["embeddings"]).dtype == np.float16  # as stored
    reader = EmbeddingReader(str(tmp_path / "npy" / "img_emb"), file_format="parquet_npy",
                             meta_columns=["key", "caption", "label"], metadata_folder=str(tmp_path / "npy" / "metadata"))
    assert (reader.count, reader.dimension) == (33, DIM)
    want = expected(cache)
    seen = {}
    for vectors, meta in reader(batch_size=5, show_progress=False):
        for vector, key, caption, label in zip(vectors, meta["key"], meta["caption"], meta["label"]):
            seen[key] = True
            stored, captions, stored_label = want[key]
            assert np.array_equal(vector.astype(np.float32), stored)  # float16 -> float32 is exact
            assert caption == (captions[0] if captions else None) and label == stored_label
    assert seen.keys() == want.keys()
    as_float32 = export_cache(cache, str(tmp_path / "npy32"), "npy", dtype="float32")
    first = np.load(as_float32["files"][0]["embeddings"])
    assert first.dtype == np.float32 and np.array_equal(first, np.stack([want[f"a.tar/{i}"][0] for i in range(20)]))


def test_arrow_export_is_a_vector_column_for_hugging_face_datasets_and_lancedb(cache, tmp_path):
    import datasets
    import lancedb

    out = tmp_path / "arrow"
    summary = export_cache(cache, str(out), "arrow")
    assert [f["rows"] for f in summary["files"]] == [20, 13]  # the empty shard writes no file
    want = expected(cache)
    loaded = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (out / "data").glob("*.parquet")),
                                   split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.features["embedding"].length == DIM and len(loaded) == 33
    for row in loaded:
        stored, captions, label = want[row["key"]]
        assert np.array_equal(np.asarray(row["embedding"], np.float32), stored)
        assert row["captions"] == captions and row["label"] == label

    table = lancedb.connect(str(tmp_path / "lance")).create_table("cache", data=pa.dataset.dataset(str(out / "data")))
    back = table.to_arrow()
    for key, vector in zip(back.column("key").to_pylist(), back.column("embedding").to_numpy(zero_copy_only=False)):
        assert np.array_equal(np.asarray(vector, np.float32), want[key][0])
    for key in ["a.tar/3", "b.tar/12"]:  # LanceDB searches the column as vectors: a row finds itself first
        hit = table.search(want[key][0]).limit(1).to_list()[0]
        assert hit["key"] == key and hit["_distance"] == pytest.approx(0, abs=1e-6)


def test_cli_exports_by_cache_id_and_refuses_a_partial_cache(cache, tmp_path, capsys):
    from litpipe.cli import main
    from litpipe.store import CacheError

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": {"format": "webdataset", "urls": "x.tar"}},
                                      "store": {"root": str(Path(cache.url).parent)}}))
    assert main(["cache", "export", cache.id[:8], str(config), "--format", "npy", "--out", str(tmp_path / "cli")]) == 0
    assert "33 rows x 12 (float16) in 3 file(s)" in capsys.readouterr().out
    partial = EmbeddingCache.open_or_create(str(tmp_path / "other"), {"model": "test", "dim": DIM}, {"inputs": ["z"]})
    with pytest.raises(CacheError, match="is partial; finish it with `litpipe precompute`"):
        export_cache(partial, str(tmp_path / "no"), "arrow")
