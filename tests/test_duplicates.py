"""The duplicate pass (`store/duplicates.py`) as a hash shuffle: its answer equals a plain dict over
every key in input order, in this process and over Ray tasks, and a driver on Ray never holds the keys."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from litpipe.store import EmbeddingCache
from litpipe.store import duplicates
from litpipe.store.commits import commit_part
from test_store_cache import DATASET, ENCODER

PARTS, ROWS = 40, 300


def write_cache(root, parts: int, rows: int, pool: int, key_pad: str = "") -> EmbeddingCache:
    """`parts` parts of `rows` distinct keys each, drawn from `pool` keys: most keys sit in several parts."""
    inputs = [f"/data/in-{i:05d}.tar" for i in range(parts)]
    dataset = {**DATASET, "inputs": [{"url": url, "size": 1, "mtime": 1.0} for url in inputs]}
    cache = EmbeddingCache.open_or_create(str(root), ENCODER, dataset)
    rng = np.random.default_rng(0)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * 8, np.float32)), 8)
    for url in inputs[::-1]:  # committed in reverse: input order, not commit order, decides the first copy
        keys = [f"k{k:07d}{key_pad}" for k in rng.choice(pool, rows, replace=False)]
        commit_part(cache, url, pa.table({"key": keys, "captions": [["c"]] * rows, "embedding": vectors}))
    return cache


def reference(cache: EmbeddingCache) -> dict[int, list[tuple[int, int]]]:
    """Every key in input order through one dict: the rule stated plainly."""
    first: dict[str, int] = {}
    later: dict[int, list[tuple[int, int]]] = {}
    for i, record in enumerate(cache.parts()):
        keys = pq.read_table(cache.file_path(record), columns=["key"]).column("key").to_pylist()
        for row, key in enumerate(keys):
            if key in first:
                later.setdefault(i, []).append((row, first[key]))
            else:
                first[key] = i
    return later


def as_pairs(later: dict) -> dict[int, list[tuple[int, int]]]:
    """The pass's answer as the reference states it; its rows come ascending."""
    for rows, _ in later.values():
        assert np.all(np.diff(rows) > 0)
    return {i: list(zip(rows.tolist(), firsts.tolist())) for i, (rows, firsts) in later.items()}


@pytest.fixture
def small_buckets(monkeypatch):
    """12 buckets and a map task every few parts, so a few thousand keys cross every path."""
    monkeypatch.setattr(duplicates, "KEYS_PER_BUCKET", 1_000)
    monkeypatch.setattr(duplicates, "MIN_KEYS_PER_MAP", 1_000)
    monkeypatch.setattr(duplicates, "MIN_KEYS_PER_OUTPUT", 10)


def test_the_pass_in_this_process_equals_a_dict_over_every_key(tmp_path, small_buckets, monkeypatch):
    monkeypatch.setattr(duplicates, "joined_ray", lambda cache: None)
    cache = write_cache(tmp_path, PARTS, ROWS, pool=4_000)
    found = as_pairs(duplicates.later_duplicates(cache, cache.parts()))
    expected = reference(cache)
    assert sum(map(len, expected.values())) > 5_000  # most of the 12,000 rows are later copies
    assert found == expected


def test_the_pass_over_ray_tasks_equals_a_dict_over_every_key(tmp_path, small_buckets, ray_local):
    cache = write_cache(tmp_path, PARTS, ROWS, pool=4_000)
    assert duplicates.joined_ray(cache) is ray_local
    assert as_pairs(duplicates.later_duplicates(cache, cache.parts())) == reference(cache)


def test_a_map_task_is_sent_what_reading_keys_needs_of_each_record(tmp_path):
    """Every map task is submitted at once, so a run's driver holds every part's record as task
    arguments; the skip records and row-group counts were most of their bytes."""
    import pickle

    cache = write_cache(tmp_path, 30, 5, pool=1_000)
    errors = [{"key": f"bad{k}", "reason": "undecodable image: cannot identify image file"} for k in range(3)]
    commit_part(cache, "/data/in-late.tar", pa.table({"key": ["z1"], "captions": [["c"]], "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(8, np.float32)), 8)}), errors)
    records = cache.parts()
    tasks = duplicates.map_tasks(records, 40)
    assert [first for first, _ in tasks] == list(range(0, 31, 8)) and sum(len(chunk) for _, chunk in tasks) == 31
    assert all(set(r) <= set(duplicates.KEY_FIELDS) for _, chunk in tasks for r in chunk)
    assert sum(len(pickle.dumps(chunk)) for _, chunk in tasks) < len(pickle.dumps(records)) / 2


DRIVER = """
import json, sys
import pyarrow as pa
from litpipe.store import EmbeddingCache
from litpipe.store import duplicates
duplicates.KEYS_PER_BUCKET = duplicates.MIN_KEYS_PER_MAP = 100_000 if sys.argv[2] == "ray" else 25_000
duplicates.MIN_KEYS_PER_OUTPUT = 1_000
if sys.argv[2] == "ray":
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
cache = EmbeddingCache.open(sys.argv[1])
records = cache.parts()
before = pa.default_memory_pool().max_memory()
later = duplicates.later_duplicates(cache, records)
print(json.dumps({"before": before, "peak": pa.default_memory_pool().max_memory(),
                  "later": sorted([i, rows.tolist(), firsts.tolist()] for i, (rows, firsts) in later.items())}))
"""


@pytest.mark.parametrize("where", ["ray", "here"])
def test_the_pass_holds_the_duplicates_not_the_keys(tmp_path, where):
    """400,000 keys of 40 bytes (16 MB). A driver on Ray (4 buckets): its Arrow memory stays under a
    tenth of the keys' bytes. Without Ray (16 buckets): one map task's keys and one bucket's, under half.
    Grouping every key in one process, as finalize did, takes more than all of them."""
    cache = write_cache(tmp_path, parts=100, rows=4_000, pool=2_000_000, key_pad="-" + "x" * 31)
    key_bytes = 100 * 4_000 * 40
    run = subprocess.run([sys.executable, "-c", DRIVER, cache.url, where], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["peak"] - out["before"] < key_bytes / (10 if where == "ray" else 2), out["peak"]
    assert {i: list(zip(rows, firsts)) for i, rows, firsts in out["later"]} == reference(cache)
