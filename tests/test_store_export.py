"""`litpipe cache export`: a cache in clip-retrieval's npy layout and as vector Parquet, read back by the tools
that consume them (autofaiss, embedding-reader, Hugging Face datasets, LanceDB), every vector compared."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from litpipe.store.commits import commit_part, finalize
from litpipe.store import EmbeddingCache, load_all
from litpipe.store.export import export_cache

DIM = 12
# rows per input shard; c's only sample was bad. Ten shards with rows: file names need two digits.
SHARDS = {"a.tar": 20, "b.tar": 13, "c.tar": 0, **{f"{name}.tar": 1 + i % 3 for i, name in enumerate("defghijk")}}
ROWS = sum(SHARDS.values())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A float16 cache of eleven shards (one with labels, others without, one empty) in row groups of 7, whose
    metadata has img2dataset's url on b.tar's rows."""
    root = tmp_path_factory.mktemp("export-store")
    cache = EmbeddingCache.open_or_create(str(root), {"model": "test", "dim": DIM}, {"inputs": list(SHARDS)},
                                          embedding_dtype="float16", row_group_rows=7)
    rng = np.random.default_rng(0)
    for shard, rows in SHARDS.items():
        columns = {"key": pa.array([f"{shard}/{i}" for i in range(rows)], pa.string()),
                   "captions": pa.array([[f"caption {i} of {shard}"] * (i % 3) for i in range(rows)], pa.list_(pa.string())),
                   "embedding": pa.FixedSizeListArray.from_arrays(rng.normal(size=rows * DIM).astype(np.float32), DIM),
                   "metadata": pa.array([f'{{"i": {i}, "url": "https://x/{i}.jpg"}}' if shard == "b.tar" else f'{{"i": {i}}}'
                                         for i in range(rows)], pa.string())}
        if shard == "a.tar":
            columns["label"] = [i % 4 for i in range(rows)]
        errors = [{"key": f"{shard}/bad", "reason": "undecodable image"}] if rows == 0 else []
        commit_part(cache, shard, pa.table(columns), errors)
    finalize(cache)
    return cache


def expected(cache) -> dict:
    contents = load_all(cache)
    labels = contents.labels.tolist()
    return {key: (vector, captions, label) for key, vector, captions, label
            in zip(contents.keys, contents.embeddings.numpy(), contents.captions, labels)}


def test_npy_export_is_clip_retrievals_layout_read_by_embedding_reader_in_row_order(cache, tmp_path):
    from embedding_reader import EmbeddingReader

    summary = export_cache(cache, str(tmp_path / "npy"), "npy")
    assert (summary["dtype"], summary["normalised"], summary["rows"]) == ("float16", True, ROWS)
    assert [Path(f["embeddings"]).name for f in summary["files"]][:3] == ["img_emb_00.npy", "img_emb_01.npy", "img_emb_02.npy"]
    assert sorted(p.name for p in (tmp_path / "npy" / "metadata").iterdir())[-1] == "metadata_09.parquet"
    reader = EmbeddingReader(str(tmp_path / "npy" / "img_emb"), file_format="parquet_npy",
                             meta_columns=["image_path", "caption", "url", "key", "label"],
                             metadata_folder=str(tmp_path / "npy" / "metadata"))
    assert (reader.count, reader.dimension) == (ROWS, DIM)
    contents = load_all(cache)
    unit = contents.embeddings.numpy() / np.linalg.norm(contents.embeddings.numpy(), axis=1, keepdims=True)
    rows = [(vectors, meta) for vectors, meta in reader(batch_size=5, show_progress=False)]
    vectors = np.concatenate([v for v, _ in rows])
    meta = {name: [x for _, m in rows for x in m[name]] for name in ("image_path", "caption", "url", "key", "label")}
    assert meta["key"] == contents.keys  # the reader's order is the cache's row order
    assert meta["image_path"] == contents.keys  # a tar sample's path is its key, as clip-retrieval names it
    np.testing.assert_allclose(vectors.astype(np.float32), unit, atol=1e-3)  # float16 of the unit vector
    assert np.abs(np.linalg.norm(vectors.astype(np.float32), axis=1) - 1).max() < 2e-3
    assert meta["caption"] == [c[0] if c else None for c in contents.captions]
    assert meta["label"] == contents.labels.tolist()
    assert [u for k, u in zip(meta["key"], meta["url"]) if k.startswith("b.tar")] == [f"https://x/{i}.jpg" for i in range(13)]
    assert all(u is None for k, u in zip(meta["key"], meta["url"]) if not k.startswith("b.tar"))

    raw = export_cache(cache, str(tmp_path / "npy-raw"), "npy", raw=True)  # the stored vectors, bit for bit
    assert raw["dtype"] == "float16" and not raw["normalised"]
    first = np.load(raw["files"][0]["embeddings"])
    assert np.array_equal(first.astype(np.float32), contents.embeddings.numpy()[:20])
    as_float32 = export_cache(cache, str(tmp_path / "npy32"), "npy", dtype="float32", raw=True)
    assert np.load(as_float32["files"][0]["embeddings"]).dtype == np.float32


def test_an_autofaiss_inner_product_index_of_the_npy_export_finds_each_row_first(cache, tmp_path):
    from autofaiss import build_index

    summary = export_cache(cache, str(tmp_path / "npy"), "npy")
    index, _ = build_index(embeddings=str(tmp_path / "npy" / "img_emb"), index_path=None, index_infos_path=None,
                           save_on_disk=False, metric_type="ip", max_index_memory_usage="100M",
                           current_memory_available="1G", verbose=40)
    stored = load_all(cache).embeddings.numpy()  # the raw vectors as probes: a user's query is not normalised either
    _, found = index.search(stored, 1)
    assert summary["rows"] == index.ntotal and (found[:, 0] == np.arange(len(stored))).all()
    raw = export_cache(cache, str(tmp_path / "raw"), "npy", raw=True)
    index, _ = build_index(embeddings=str(tmp_path / "raw" / "img_emb"), index_path=None, index_infos_path=None,
                           save_on_disk=False, metric_type="ip", max_index_memory_usage="100M",
                           current_memory_available="1G", verbose=40)
    _, found = index.search(stored, 1)
    assert raw["rows"] == index.ntotal and (found[:, 0] != np.arange(len(stored))).any()  # why normalising matters


def test_a_folder_datasets_export_shows_each_images_path(tmp_path):
    cache = EmbeddingCache.open_or_create(str(tmp_path / "store"), {"model": "test", "dim": 2}, {"inputs": ["f"]})
    commit_part(cache, "f", pa.table({
        "key": ["cats/1", "dogs/2"], "captions": [["a cat"], ["a dog"]],
        "embedding": pa.FixedSizeListArray.from_arrays(np.ones(4, np.float32), 2),
        "metadata": ['{"path": "cats/1.jpg", "source": "x"}', '{"path": "dogs/2.png"}']}), [])
    finalize(cache)
    summary = export_cache(cache, str(tmp_path / "npy"), "npy")
    assert Path(summary["files"][0]["embeddings"]).name == "img_emb_0.npy"
    meta = pq.read_table(summary["files"][0]["metadata"])
    assert meta.column("image_path").to_pylist() == ["cats/1.jpg", "dogs/2.png"]
    assert meta.column("url").to_pylist() == [None, None]


def test_arrow_export_is_a_vector_column_for_hugging_face_datasets_and_lancedb(cache, tmp_path):
    import datasets
    import lancedb

    out = tmp_path / "arrow"
    summary = export_cache(cache, str(out), "arrow")
    assert [f["rows"] for f in summary["files"]] == [n for n in SHARDS.values() if n]  # an empty shard writes no file
    want = expected(cache)
    loaded = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (out / "data").glob("*.parquet")),
                                   split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.features["embedding"].length == DIM and len(loaded) == ROWS
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
    assert f"{ROWS} rows x 12 (float16, L2-normalised) in 10 file(s)" in capsys.readouterr().out
    partial = EmbeddingCache.open_or_create(str(tmp_path / "other"), {"model": "test", "dim": DIM}, {"inputs": ["z"]})
    with pytest.raises(CacheError, match="is partial; finish it with `litpipe precompute`"):
        export_cache(partial, str(tmp_path / "no"), "arrow")
