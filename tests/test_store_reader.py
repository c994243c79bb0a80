"""The streaming reader's contract with distributed training, and load_all, against what was written."""

import threading
import uuid

import numpy as np
import pyarrow as pa
import pytest

from litpipe.store.commits import commit_part, finalize
from litpipe.store.parts import open_part
from litpipe.store import CacheError, EmbeddingCache, StreamingReader, load_all
from litpipe.store import reader as reader_module

DIM = 6
ENCODER = {"model": "tiny", "dim": DIM, "spec": {}}
SHARD_ROWS = [37, 50, 13, 21]  # uneven on purpose; row groups of 16 split them further
INPUTS = [f"/data/r-{i}.tar" for i in range(len(SHARD_ROWS))]
DATASET = {"format": "webdataset", "options": {}, "inputs": [{"url": u, "size": 1, "mtime": 1.0} for u in INPUTS]}


def _write(root: str, embedding_dtype: str = "float16") -> tuple[EmbeddingCache, dict]:
    """A cache plus the float64 reference vector of every key."""
    cache = EmbeddingCache.open_or_create(root, ENCODER, DATASET, embedding_dtype=embedding_dtype, row_group_rows=16)
    reference = {}
    for s, (url, rows) in enumerate(zip(INPUTS, SHARD_ROWS)):
        vectors = np.random.default_rng(s).standard_normal((rows, DIM)).astype(np.float32)
        keys = [f"{s}/{i}" for i in range(rows)]
        commit_part(cache, url, pa.table({
            "key": keys,
            "captions": [[f"a photo of {k}"] for k in keys],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM),
            "label": np.full(rows, s, dtype=np.int64),
        }))
        stored = vectors.astype(embedding_dtype).astype(np.float64)
        reference.update(zip(keys, stored))
    return cache, reference


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return _write(str(tmp_path_factory.mktemp("reader") / "store"))


def _epoch(cache, **kwargs):
    return [(b.keys, b.embeddings.numpy().copy()) for b in StreamingReader(cache, **kwargs)]


@pytest.mark.parametrize("world_size,batch_size,shuffle_row_groups", [(1, 8, 4), (3, 5, 1), (4, 7, 100)])
def test_every_key_at_most_once_per_epoch_with_equal_batch_counts_on_every_rank(written, world_size, batch_size, shuffle_row_groups):
    cache, reference = written
    total = sum(SHARD_ROWS)
    per_rank = [_epoch(cache, batch_size=batch_size, rank=r, world_size=world_size, seed=3, epoch=1,
                       shuffle_row_groups=shuffle_row_groups) for r in range(world_size)]
    expected_batches = (total // world_size) // batch_size
    assert [len(batches) for batches in per_rank] == [expected_batches] * world_size
    assert len(StreamingReader(cache, batch_size, rank=0, world_size=world_size)) == expected_batches
    keys = [k for batches in per_rank for ks, _ in batches for k in ks]
    assert len(keys) == len(set(keys)) == expected_batches * batch_size * world_size
    assert total - len(keys) < world_size * (batch_size + 1)  # only the remainder is dropped
    for batches in per_rank:
        for ks, vectors in batches:
            assert vectors.dtype == np.float32 and vectors.shape == (batch_size, DIM)
            np.testing.assert_array_equal(vectors.astype(np.float64), np.stack([reference[k] for k in ks]))


def test_unshuffled_single_rank_reads_every_key_in_shard_order(written):
    cache, reference = written
    batches = _epoch(cache, batch_size=11, shuffle=False)
    assert [k for ks, _ in batches for k in ks] == list(reference)[: len(batches) * 11]


def test_shuffle_is_a_function_of_seed_and_epoch(written):
    cache, _ = written
    order = lambda **kw: [k for ks, _ in _epoch(cache, batch_size=4, rank=1, world_size=2, **kw) for k in ks]  # noqa: E731
    assert order(seed=0, epoch=0) == order(seed=0, epoch=0)
    assert order(seed=0, epoch=1) != order(seed=0, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=0, epoch=0)
    assert sorted(order(seed=0, epoch=0)) != sorted(order(seed=0, epoch=1))  # a different remainder each epoch


@pytest.mark.parametrize("start_step", [1, 5, 9])
def test_resuming_from_a_step_yields_the_tail_of_the_full_epoch(written, start_step):
    cache, _ = written
    kwargs = dict(batch_size=5, rank=1, world_size=2, seed=7, epoch=2, shuffle_row_groups=2)
    full = _epoch(cache, **kwargs)
    resumed = StreamingReader(cache, start_step=start_step, **kwargs)
    assert len(resumed) == len(full) - start_step
    tail = [(b.keys, b.embeddings.numpy()) for b in resumed]
    assert [k for k, _ in tail] == [k for k, _ in full[start_step:]]
    for (_, got), (_, want) in zip(tail, full[start_step:]):
        np.testing.assert_array_equal(got, want)


def test_batches_carry_captions_and_labels_of_their_keys(written):
    cache, _ = written
    batch = next(iter(StreamingReader(cache, batch_size=9, seed=1)))
    assert batch.captions == [[f"a photo of {k}"] for k in batch.keys]
    assert type(batch.keys) is list and all(type(k) is str for k in batch.keys)  # plain Python, not numpy
    assert type(batch.captions) is list and all(type(c) is list for c in batch.captions)
    assert batch.labels.tolist() == [int(k.split("/")[0]) for k in batch.keys]


def test_stopping_early_stops_the_prefetch_thread(written):
    cache, _ = written
    before = threading.active_count()
    iterator = iter(StreamingReader(cache, batch_size=2, prefetch=1))
    next(iterator)
    iterator.close()
    assert threading.active_count() == before


def test_too_few_rows_for_one_batch_per_rank_is_an_error_naming_the_fix(written):
    cache, _ = written
    with pytest.raises(CacheError, match="cannot give each of 4 rank.*lower the batch size"):
        StreamingReader(cache, batch_size=100, world_size=4)


def test_load_all_equals_what_was_written(written):
    cache, reference = written
    contents = load_all(cache)
    assert contents.keys == list(reference)
    np.testing.assert_array_equal(contents.embeddings.double().numpy(), np.stack(list(reference.values())))
    assert contents.embeddings.is_contiguous() and contents.captions[0] == ["a photo of 0/0"]
    assert contents.labels.tolist() == [s for s, rows in enumerate(SHARD_ROWS) for _ in range(rows)]
    vectors_only = load_all(cache, text=False)
    assert vectors_only.keys == [] and bool((vectors_only.embeddings == contents.embeddings).all())


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_remote_caches_stream_and_load_like_local_ones(store, request):
    root = f"memory://reader-{uuid.uuid4().hex[:8]}" if store == "memory" else request.getfixturevalue("s3_root")
    cache, reference = _write(root, embedding_dtype="float32")
    finalize(cache)
    cache = EmbeddingCache.find(root, ENCODER, DATASET, "float32")
    keys = [k for b in StreamingReader(cache, batch_size=10, rank=0, world_size=2) for k in b.keys]
    keys += [k for b in StreamingReader(cache, batch_size=10, rank=1, world_size=2) for k in b.keys]
    assert len(keys) == len(set(keys)) == 120
    np.testing.assert_array_equal(load_all(cache).embeddings.double().numpy(), np.stack(list(reference.values())))


def test_shards_without_labels_read_as_label_minus_one_beside_labelled_shards(tmp_path):
    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET, row_group_rows=16)
    for s, labelled in enumerate([False, True, False]):  # the first shard has none: labels still found
        columns = {"key": [f"{s}/{i}" for i in range(4)], "captions": [["c"]] * 4,
                   "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4 * DIM, np.float32)), DIM)}
        if labelled:
            columns["label"] = pa.array([7, None, 8, 9], pa.int64())
        commit_part(cache, INPUTS[s], pa.table(columns))
    loaded = load_all(cache)
    by_key = dict(zip(loaded.keys, loaded.labels.tolist()))
    assert [by_key[f"1/{i}"] for i in range(4)] == [7, -1, 8, 9]
    assert {by_key[f"{s}/{i}"] for s in (0, 2) for i in range(4)} == {-1}
    streamed = {k: int(label) for b in StreamingReader(cache, 4, shuffle=False) for k, label in zip(b.keys, b.labels)}
    assert streamed == by_key


def test_an_epoch_keeps_few_shard_files_open_and_closes_them_all_at_its_end(written, monkeypatch):
    cache, reference = written
    monkeypatch.setattr(reader_module, "MAX_OPEN_SHARDS", 1)
    opened = []
    monkeypatch.setattr(reader_module, "open_part", lambda cache, record: opened.append(open_part(cache, record)) or opened[-1])
    batches = _epoch(cache, batch_size=5, seed=2, shuffle_row_groups=3)
    for keys, vectors in batches:  # evicted shards are reopened, rows unchanged
        np.testing.assert_array_equal(vectors.astype(np.float64), np.stack([reference[k] for k in keys]))
    assert len(opened) > len(SHARD_ROWS) and all(parquet.closed for parquet in opened)


def test_a_batch_mixes_rows_of_many_input_shards(tmp_path):
    """Web datasets are sharded by crawl order: on 64 shards of 20,000 rows, every batch of 256
    draws from at least 16 shards (the reader that windowed 65,536 consecutive rows drew from 4)."""
    encoder = {"model": "tiny", "dim": 2, "spec": {}}
    inputs = [f"/data/crawl-{i:03d}.tar" for i in range(64)]
    dataset = {"format": "webdataset", "options": {}, "inputs": [{"url": u, "size": 1, "mtime": 1.0} for u in inputs]}
    cache = EmbeddingCache.open_or_create(str(tmp_path / "store"), encoder, dataset, row_group_rows=65536)
    one_caption_each = pa.ListArray.from_arrays(pa.array(np.arange(20_001, dtype=np.int32)), pa.array(["c"] * 20_000))
    for s, url in enumerate(inputs):
        commit_part(cache, url, pa.table({
            "key": [f"{s}/{i}" for i in range(20_000)], "captions": one_caption_each,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(40_000, np.float32)), 2)}))
    shards_per_batch = [len({k.split("/")[0] for k in b.keys}) for b in StreamingReader(cache, 256, seed=0, shuffle_row_groups=16)]
    assert len(shards_per_batch) == 64 * 20_000 // 256 and min(shards_per_batch) >= 16
