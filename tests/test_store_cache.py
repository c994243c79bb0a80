"""The cache's write side and lookup, on local disk, memory:// and S3 (moto's server over loopback)."""

import json
import multiprocessing
import threading
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from litpipe.store.commits import commit_part, finalize
from litpipe.store.maintenance import orphans, remove_orphans, verify
from litpipe.config import validate_config
from litpipe.store import CacheError, EmbeddingCache, list_caches, load_all, resolve_cache
from litpipe.store.sharing import remove_cache
from litpipe.store.cache import FORMAT_VERSION, shard_name

DIM = 8
ENCODER = {"model": "tiny", "pretrained": None, "weights_sha256": "w1", "output": "projected", "normalize": False,
           "precision": "fp32", "dim": DIM,
           "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                          "resize_mode": "shortest", "transform": "..."},
           "spec": {"model": "tiny"}}
DATASET = {"format": "webdataset", "options": {}, "inputs": [{"url": f"/data/in-{i}.tar", "size": 1, "mtime": 1.0} for i in range(4)]}
INPUTS = [e["url"] for e in DATASET["inputs"]]


def shard_table(prefix: str, rows: int, seed: int = 0, dim: int = DIM, writer: str = "w") -> pa.Table:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return pa.table({
        "key": [f"{prefix}/{i}" for i in range(rows)],
        "captions": [[f"caption {prefix} {i}", "alt"] for i in range(rows)],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        "label": np.arange(rows, dtype=np.int64),
        "writer": [writer] * rows,
    })


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://store-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_root")


def test_committed_shards_read_back_exactly_and_finalize_consolidates(root):
    cache = EmbeddingCache.open_or_create(root, ENCODER, DATASET, row_group_rows=4)
    tables = {url: shard_table(f"s{i}", 5 + i, seed=i) for i, url in enumerate(INPUTS)}
    for i, (url, table) in enumerate(tables.items()):
        record = commit_part(cache, url, table, [{"key": f"bad{i}", "reason": "undecodable image"}])
        assert record["rows"] == table.num_rows and sum(record["row_groups"]) == table.num_rows and record["row_groups"][0] == 4
    assert cache.committed_inputs() == set(INPUTS) and not cache.complete
    assert sorted(e["key"] for e in cache.errors()) == ["bad0", "bad1", "bad2", "bad3"]

    manifest = finalize(cache, expected_inputs=INPUTS)
    assert manifest["complete"] and manifest["num_rows"] == sum(t.num_rows for t in tables.values())
    assert manifest["error_counts"] == {"undecodable image": 4} and manifest["format_version"] == FORMAT_VERSION

    found = EmbeddingCache.find(root, ENCODER, DATASET)
    assert found.complete and found.id == cache.id and found.dim == DIM
    assert {e["input"] for e in found.errors()} == set(INPUTS)
    contents = load_all(found)
    expected = np.concatenate([t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
                               for t in tables.values()]).astype(np.float16).astype(np.float64)
    np.testing.assert_array_equal(contents.embeddings.double().numpy(), expected)
    assert contents.keys == [k for t in tables.values() for k in t.column("key").to_pylist()]
    assert contents.captions[0] == ["caption s0 0", "alt"]
    assert contents.labels.tolist() == [i for t in tables.values() for i in range(t.num_rows)]
    assert verify(found) == []


def test_crash_before_commit_leaves_exactly_the_committed_shards_and_resume_writes_each_key_once(root):
    cache = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    commit_part(cache, INPUTS[0], shard_table("s0", 6))
    # What a writer killed mid-shard leaves: a partial data file under its unique name, no record.
    fs, path = fsspec.core.url_to_fs(cache.url)
    partial = f"shards/{shard_name(INPUTS[1])}.0123456789ab.parquet"
    fs.pipe_file(f"{path}/{partial}", b"PAR1 partial")

    reopened = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    assert reopened.committed_inputs() == {INPUTS[0]} and reopened.num_rows == 6
    assert load_all(reopened).keys == [f"s0/{i}" for i in range(6)]
    for i, url in enumerate(INPUTS):
        if url not in reopened.committed_inputs():
            commit_part(reopened, url, shard_table(f"s{i}", 6))
    keys = load_all(reopened).keys
    assert len(keys) == len(set(keys)) == 6 * len(INPUTS)
    assert [p.split(": ")[1] for p in verify(reopened)] == ["orphaned data file, in no commit record "
                                                             f"(a crashed or losing writer); `litpipe cache rm {cache.id} --orphans` deletes it"]
    assert remove_orphans(reopened) == [partial]
    assert verify(reopened) == []


def test_on_s3_a_commit_is_four_requests_and_reading_a_record_is_one(s3_root):
    """Requests per part are the store's running cost at scale: a commit is the check that the part is not
    committed yet, the data and record PUTs, and reading the record back; a process opening a partial cache
    lists commits/ and GETs each record. s3fs's own calls would add a HEAD before each small GET, a listing
    after the check's 404 and a bucket HEAD for each `makedirs`: 8 requests a commit before."""
    from collections import Counter

    cache = EmbeddingCache.open_or_create(s3_root, ENCODER, DATASET)
    sent = Counter()
    cache.fs.connect(refresh=False)
    cache.fs.s3.meta.events.register("before-parameter-build.s3", lambda model, params, **_: sent.update(
        [(model.name, "/commits/" in params.get("Key", ""))]))
    for i in range(3):
        commit_part(cache, INPUTS[i], shard_table(f"s{i}", 3, seed=i))
    assert sent == {("GetObject", True): 6, ("PutObject", True): 3, ("PutObject", False): 3}
    sent.clear()
    assert [r["input"] for r in EmbeddingCache.open(cache.url).parts()] == INPUTS[:3]
    assert {op: n for (op, record), n in sent.items() if record} == {"GetObject": 3}


def test_two_writers_racing_on_the_same_inputs_commit_each_key_once(root):
    results = {}

    def write(writer):
        cache = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
        results[writer] = [commit_part(cache, url, shard_table(f"s{i}", 5, writer=writer)) for i, url in enumerate(INPUTS)]

    threads = [threading.Thread(target=write, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache = EmbeddingCache.find(root, ENCODER, DATASET)
    assert sorted(s["input"] for s in cache.parts()) == sorted(INPUTS)
    keys = load_all(cache).keys
    assert len(keys) == len(set(keys)) == 5 * len(INPUTS)
    if not root.startswith("s3://"):  # moto's conditional PUT is not atomic under races; AWS's is
        assert all((ra is None) != (rb is None) for ra, rb in zip(results["a"], results["b"]))
    remove_orphans(cache)
    assert verify(cache) == []


def _commit_all_in_process(root):
    cache = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    return [commit_part(cache, url, shard_table(f"s{i}", 5)) is not None for i, url in enumerate(INPUTS)]


def test_two_writer_processes_on_local_disk_commit_each_input_once(tmp_path):
    root = str(tmp_path / "store")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        won = pool.map(_commit_all_in_process, [root, root])
    assert [a + b for a, b in zip(*won)] == [1] * len(INPUTS)
    cache = EmbeddingCache.find(root, ENCODER, DATASET)
    assert cache.num_rows == 5 * len(INPUTS) and orphans(cache) == [] and verify(cache) == []


def test_same_fingerprints_find_the_cache_and_changed_preprocessing_does_not(root):
    cache = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    commit_part(cache, INPUTS[0], shard_table("s0", 3))
    assert EmbeddingCache.open_or_create(root, ENCODER, DATASET).id == cache.id
    assert EmbeddingCache.find(root, json.loads(json.dumps(ENCODER)), DATASET).num_rows == 3
    changed = {**ENCODER, "preprocess": {**ENCODER["preprocess"], "interpolation": "bilinear"}}
    assert EmbeddingCache.find(root, changed, DATASET) is None
    assert EmbeddingCache.find(root, {**ENCODER, "weights_sha256": "w2"}, DATASET) is None
    assert EmbeddingCache.find(root, ENCODER, {**DATASET, "inputs": DATASET["inputs"][:2]}) is None
    assert [c.id for c in list_caches(root)] == [cache.id]
    remove_cache(cache)
    assert EmbeddingCache.find(root, ENCODER, DATASET) is None and list_caches(root) == []


def _pipeline_cfg(tmp_path):
    (tmp_path / "in-0.tar").write_bytes(b"tar")
    return validate_config({"data": {"train": {"format": "webdataset", "urls": str(tmp_path / "in-*.tar")}},
                            "store": {"root": str(tmp_path / "store")}})


def test_resolve_cache_matches_encoder_spec_and_dataset_and_prefers_complete(tmp_path):
    from litpipe.store.fingerprint import dataset_fingerprint

    cfg = _pipeline_cfg(tmp_path)
    data_fp = dataset_fingerprint(cfg.data["train"])
    spec = cfg.encoder.spec()
    with pytest.raises(CacheError, match="no float16 cache of dataset `train`.*run `litpipe precompute`"):
        resolve_cache(cfg, "train")
    complete = EmbeddingCache.open_or_create(cfg.store.root, {**ENCODER, "spec": spec}, data_fp)
    commit_part(complete, data_fp["inputs"][0]["url"], shard_table("a", 3))
    finalize(complete)
    partial = EmbeddingCache.open_or_create(cfg.store.root, {**ENCODER, "weights_sha256": "w2", "spec": spec}, data_fp)
    EmbeddingCache.open_or_create(cfg.store.root, {**ENCODER, "spec": {**spec, "image_size": 64}}, data_fp)
    assert resolve_cache(cfg, "train").id == complete.id
    assert resolve_cache(cfg, "train", explicit=partial.id).id == partial.id
    assert resolve_cache(cfg, "train", explicit=partial.url).id == partial.id


def test_commit_refuses_wrong_dim_duplicate_keys_and_a_finalized_cache(tmp_path):
    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET)
    with pytest.raises(CacheError, match=f"shard of {INPUTS[0]}: embedding dim 4 differs from the cache's 8"):
        commit_part(cache, INPUTS[0], shard_table("s", 3, dim=4))
    doubled = pa.concat_tables([shard_table("s", 2), shard_table("s", 2)])
    with pytest.raises(CacheError, match="duplicate keys"):
        commit_part(cache, INPUTS[0], doubled)
    with pytest.raises(CacheError, match="missing column"):
        commit_part(cache, INPUTS[0], shard_table("s", 2).drop_columns(["captions"]))
    commit_part(cache, INPUTS[0], shard_table("s", 2))
    with pytest.raises(CacheError, match="1 input shard.*not committed.*re-run `litpipe precompute`"):
        finalize(cache, expected_inputs=INPUTS[:2])
    finalize(cache)
    assert commit_part(cache, INPUTS[0], shard_table("s", 2)) is None
    with pytest.raises(CacheError, match="is complete"):
        commit_part(cache, INPUTS[1], shard_table("t", 2))


def test_float32_caches_keep_float32_vectors(tmp_path):
    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET, embedding_dtype="float32")
    table = shard_table("s", 4)
    commit_part(cache, INPUTS[0], table)
    expected = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, DIM)
    np.testing.assert_array_equal(load_all(cache).embeddings.numpy(), expected)


@pytest.fixture
def written(tmp_path):
    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET)
    for i, url in enumerate(INPUTS[:2]):
        commit_part(cache, url, shard_table(f"s{i}", 5, seed=i))
    return cache


def test_missing_corrupt_and_too_new_manifests_name_the_file_and_the_fix(written, tmp_path):
    with pytest.raises(CacheError, match=f"{tmp_path}/nope/manifest.json: no cache manifest here.*litpipe cache ls"):
        EmbeddingCache.open(str(tmp_path / "nope"))
    with pytest.raises(CacheError, match="zzz: no cache with this id.*litpipe cache ls"):
        EmbeddingCache.open("zzz", root=str(tmp_path))
    manifest = tmp_path / written.id / "manifest.json"
    original = manifest.read_text()
    manifest.write_text(original[: len(original) // 2])
    with pytest.raises(CacheError, match=f"{manifest}: corrupt cache manifest.*litpipe cache rm"):
        EmbeddingCache.open(written.id, root=str(tmp_path))
    manifest.write_text(json.dumps({**json.loads(original), "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CacheError, match=f"{manifest}: cache format version {FORMAT_VERSION + 1} is newer.*upgrade litpipe"):
        EmbeddingCache.open(written.id, root=str(tmp_path))
    manifest.write_text(json.dumps({**json.loads(original), "complete": True}))
    with pytest.raises(CacheError, match=f"{manifest}: corrupt cache manifest \\(complete, but no list of its parts"):
        EmbeddingCache.open(written.id, root=str(tmp_path))


def test_truncated_shard_and_dim_mismatch_fail_reads_naming_the_shard(written, tmp_path):
    shard = tmp_path / written.id / written.parts()[0]["path"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])
    with pytest.raises(CacheError, match=f"{shard}: unreadable Parquet shard, truncated or corrupt.*litpipe cache verify"):
        load_all(written)
    shard.write_bytes(data)
    written.manifest["dim"] = 16
    with pytest.raises(CacheError, match=f"{shard}: embedding dim 8 differs from the cache's 16"):
        load_all(written)


def test_verify_reports_corruption_nan_and_duplicate_keys_by_file(written, tmp_path, monkeypatch):
    assert verify(written) == []
    first, second = written.parts()
    path = tmp_path / written.id / second["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = shard_table("s0", 3)  # keys s0/0..2 again, and a NaN vector
    vectors = bad.column("embedding").combine_chunks().flatten().to_numpy().copy()
    vectors[0] = np.nan
    bad = bad.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors), DIM))
    commit_part(written, INPUTS[2], bad)
    problems = verify(written)
    assert any(p.startswith(f"{written.url}/{second['path']}: sha256 differs") for p in problems)
    third = next(s for s in written.parts() if s["input"] == INPUTS[2])
    assert f"{written.url}/{third['path']}: 1 embedding(s) with NaN or inf" in problems
    assert not any("duplicate key" in p for p in problems)  # a partial cache's: finalize keeps the first copy
    # A complete cache that kept both copies (written by a litpipe before duplicates were dropped) is damaged.
    path.write_bytes(bytes(data[:len(data) // 3]) + bytes([data[len(data) // 3] ^ 0xFF]) + bytes(data[len(data) // 3 + 1:]))
    monkeypatch.setattr("litpipe.store.commits.later_duplicates", lambda cache, records: {})
    finalize(written)
    duplicate = f"{written.url}/{third['path']}: key 's0/0' also in {first['path']} (duplicate key)"
    assert duplicate in verify(written)
    path.write_bytes(bytes(data))  # a damaged part elsewhere is named, and the other parts' keys still checked
    problems = verify(written)
    assert duplicate in problems and any(p.startswith(f"{written.url}/{second['path']}: sha256 differs") for p in problems)


def test_finalize_holds_no_record_in_memory_and_writes_the_manifest_one_record_a_line(tmp_path, monkeypatch):
    """A run's driver holds every part record at finalize, and every process that opens a complete cache
    holds them while it reads. As dicts, with the copies finalize made, that was 3.8 kB a part held and
    7.7 kB at finalize's peak (three skips a part; 80 MB of the driver at 10,000 parts,
    docs/benchmarks.md); as compact JSON lines in memory 1.2 and 2.6 kB. Spooled, a complete cache's
    records cost 16 bytes a part, and finalize's peak is what it held of commits/ and a listing."""
    import gc
    import tracemalloc

    def measured(parts: int) -> tuple[int, int, int, int, EmbeddingCache]:
        cache = EmbeddingCache.open_or_create(str(tmp_path / str(parts)), ENCODER, DATASET, rows_per_commit=2)
        skips = [{"key": f"bad{k}", "reason": "undecodable image: cannot identify image file"} for k in range(3)]
        for k in range(parts):
            commit_part(cache, INPUTS[0], shard_table(f"p{k:04d}", 2), skips, part=k, last=k == parts - 1)
        driver = EmbeddingCache.open(cache.url)  # reads every record at finalize, as a run's driver does
        tracemalloc.start()
        records = driver.parts()
        reading = tracemalloc.get_traced_memory()[0]
        finalize(driver)
        peak = tracemalloc.get_traced_memory()[1]
        del records
        gc.collect()  # a full collection empties the free lists, whose objects count as traced
        held = tracemalloc.get_traced_memory()[0]
        reader = EmbeddingCache.open(driver.url)
        gc.collect()
        opened = tracemalloc.get_traced_memory()[0] - held
        tracemalloc.stop()
        assert len(reader.parts()) == parts
        return reading, held, peak, opened, driver

    # The duplicate pass (tests/test_duplicates.py) runs in Ray tasks under a run's driver: here, finalize's own share.
    monkeypatch.setattr("litpipe.store.commits.later_duplicates", lambda cache, records: {})
    monkeypatch.setattr("litpipe.store.records.SPOOL_MEMORY", 1)  # the lines on disk from the first, as past 1 MB
    few, many = measured(400), measured(1200)  # the slope: one-offs cancel
    reading, held, peak, opened = ((b - a) / 800 for a, b in zip(few[:4], many[:4]))
    assert reading < 900 and held < 100 and peak < 2000 and opened < 100, (reading, held, peak, opened)
    driver = many[-1]
    text = (tmp_path / "1200" / driver.id / "manifest.json").read_text()
    records = json.loads(text)["shards"]
    assert [r["part"] for r in records] == list(range(1200)) and all(r["num_errors"] == 3 and "errors" not in r for r in records)
    assert records == list(EmbeddingCache.open(driver.url).parts()) == list(driver.parts())
    assert sum(1 for line in text.splitlines() if line.lstrip().startswith('{"bytes"')) == 1200  # one a line
    assert len(driver.errors()) == 3 * 1200 and verify(driver) == []


def test_spooled_records_read_right_in_a_forked_process_and_after_its_appends(monkeypatch):
    """A DataLoader's workers are forked with the cache's records: past SPOOL_MEMORY they are one file
    that parent and child share, so a shared file position or an append into it would garble lines."""
    import multiprocessing

    from litpipe.store.records import PartRecords

    monkeypatch.setattr("litpipe.store.records.SPOOL_MEMORY", 64)
    records = PartRecords.of({"part": k, "name": f"n{k}" * (k % 7)} for k in range(500))
    expected = [{"part": k, "name": f"n{k}" * (k % 7)} for k in range(500)]

    fork = multiprocessing.get_context("fork")
    out, appended, overwritten = fork.Queue(), fork.Event(), fork.Event()

    def child():
        seen = list(records)
        changed = records.replaced((k, json.dumps({"part": -k}).encode()) for k in range(0, 500, 3))
        appended.set()
        overwritten.wait(60)  # the parent has appended its own lines where this process put its own
        out.put((seen == expected, [r["part"] for r in changed][:7]))

    process = fork.Process(target=child)
    process.start()
    assert list(records) == expected  # read beside the child's reads
    appended.wait(60)
    mine = records.replaced((k, json.dumps({"part": 1000 + k}).encode()) for k in range(0, 500, 3))
    overwritten.set()
    same, parts = out.get(timeout=60)
    process.join(60)
    assert same and parts == [0, 1, 2, -3, 4, 5, -6]
    assert list(records) == expected and [r["part"] for r in mine][:4] == [1000, 1, 2, 1003]


def test_spread_work_starts_as_calls_end_not_in_rounds_behind_the_slowest(tmp_path, monkeypatch):
    """finalize rewrote parts in rounds of 1,024, each waiting for its slowest task (528 s against 399 at
    10M): here the first of 3,000 calls waits until the last has run, which such rounds would never
    reach; taken up as calls end, all of them run, and each output comes back as its call ends."""
    import threading

    from litpipe.store.tasks import spread_as_done

    monkeypatch.setattr("litpipe.store.tasks.joined_ray", lambda cache: None)  # threads: the calls share an Event
    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET)
    last_ran = threading.Event()

    def call(cache, k):
        if k == 0:
            assert last_ran.wait(30), "the last call never started"
        if k == 2999:
            last_ran.set()
        return k * 2

    done = list(spread_as_done(cache, call, ((k,) for k in range(3000))))
    assert sorted(done) == [(k, 2 * k) for k in range(3000)] and done.index((0, 0)) > 2900  # back as it ended


def test_a_task_gets_a_cache_without_its_part_records(tmp_path):
    """What `store.tasks.bare` sends with every task (and the token cache's workers get once) stays
    the same size as parts grow: a complete manifest lists every part, and a task sent it each time
    made a pass over N parts move N^2 records (the token cache of 10,000 parts took about 40 minutes)."""
    import pickle

    from litpipe.store.tasks import bare

    sizes = {}
    for parts in (2, 40):
        cache = EmbeddingCache.open_or_create(str(tmp_path / str(parts)), ENCODER, DATASET, rows_per_commit=3)
        for k in range(parts):
            commit_part(cache, INPUTS[0], shard_table(f"p{k:03d}", 3), part=k, last=k == parts - 1)
        finalize(cache)
        light = bare(cache)
        assert light.file_path(cache.parts()[-1]) == cache.file_path(cache.parts()[-1]) and light.dim == DIM
        sizes[parts] = (len(pickle.dumps(light)), len(pickle.dumps(cache)))
    assert abs(sizes[40][0] - sizes[2][0]) < 64 and sizes[40][1] - sizes[2][1] > 38 * 300


def test_the_token_cache_built_by_worker_processes_holds_every_caption_tokenised(tmp_path, monkeypatch):
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.train_text import token_cache

    monkeypatch.setattr(token_cache, "PARALLEL_ROWS", 0)
    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET, rows_per_commit=3)
    for k in range(4):
        commit_part(cache, INPUTS[0], shard_table(f"p{k}", 3), part=k, last=k == 3)
    finalize(cache)
    tokenizer = clip_tokenizer(8)
    tokens = token_cache.ensure_token_cache(cache, tokenizer, workers=2)
    assert tokens.complete and tokens.missing() == []
    for record in cache.parts():
        ids, offsets = tokens.rows(tokens.open_file(record), 0)
        assert len(ids) == offsets[-1] == 2 * record["rows"]
    texts = [c for row in load_all(cache).captions for c in row]
    every = np.concatenate([tokens.rows(tokens.open_file(r), 0)[0] for r in cache.parts()])
    np.testing.assert_array_equal(every, tokenizer(texts).numpy())


def test_a_commit_whose_reply_is_lost_is_still_the_writers_own(s3_server, s3_root):
    """The PUT of a commit record lands but its reply is lost: the client resends it and is told
    412 (the record exists). The writer must see its own record, not a lost race that deletes the
    data file the record names."""
    from fault_proxy import FaultProxy

    with FaultProxy(upstream=s3_server["endpoint_url"]) as proxy:
        fs = fsspec.filesystem("s3", endpoint_url=proxy.url, key="testing", secret="testing", skip_instance_cache=True)
        root = s3_root.replace("s3://", "")
        cache = EmbeddingCache.open_or_create(s3_root, ENCODER, DATASET)
        cache.fs = fs  # this writer talks to the store through the proxy
        lost = proxy.add_rule("PUT", "/commits/", "lost_response", count=1)
        record = commit_part(cache, INPUTS[0], shard_table("s0", 4))
        assert lost.fired == 1 and record is not None
        assert fs.exists(f"{root}/{cache.id}/{record['path']}")
    assert verify(EmbeddingCache.open(cache.url), ) == []


def test_adopted_shards_read_through_the_view_and_a_removal_cut_short_is_finished_by_gc(root):
    from litpipe.store.sharing import adopt_from_other_caches, collect_garbage

    donor = EmbeddingCache.open_or_create(root, ENCODER, {**DATASET, "inputs": DATASET["inputs"][:3]})
    for i, url in enumerate(INPUTS[:3]):
        commit_part(donor, url, shard_table(f"s{i}", 4, seed=i), [{"key": f"s{i}/bad", "reason": "undecodable image"}])
    finalize(donor)
    view = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    other_encoder = EmbeddingCache.open_or_create(root, {**ENCODER, "weights_sha256": "w2"}, DATASET)
    assert adopt_from_other_caches(other_encoder, INPUTS) == {}  # other weights: nothing to share
    assert adopt_from_other_caches(view, INPUTS) == {url: donor.id for url in INPUTS[:3]}
    commit_part(view, INPUTS[3], shard_table("s3", 2, seed=3))
    finalize(view)
    assert load_all(view).keys == [f"s{i}/{j}" for i in range(3) for j in range(4)] + ["s3/0", "s3/1"]
    assert sorted(e["key"] for e in view.errors()) == ["s0/bad", "s1/bad", "s2/bad"]  # skipped samples travel too
    assert verify(view) == [] and orphans(donor) == []  # files the view names are no orphans of the donor

    donor.fs.rm_file(f"{donor.path}/manifest.json")  # `cache rm` of the donor killed after its first step
    assert {c.id for c in list_caches(root)} == {view.id, other_encoder.id}
    leftovers = collect_garbage(root, dry_run=True)  # the donor's records go; the files the view names stay
    assert leftovers and not any("/shards/" in url for url in leftovers)
    assert collect_garbage(root) == leftovers and collect_garbage(root) == []
    assert verify(view) == [] and load_all(view).embeddings.shape == (14, DIM)
    remove_cache(view)  # the last cache naming the donor's files
    assert collect_garbage(root) == []
    fs, path = fsspec.core.url_to_fs(root)
    assert not [p for p in fs.find(path) if p.endswith(".parquet") and other_encoder.id not in p]


def test_a_part_taken_out_is_committed_again_and_its_file_stays_while_another_cache_names_it(root):
    from litpipe.store.sharing import adopt_from_other_caches, remove_part

    donor = EmbeddingCache.open_or_create(root, ENCODER, {**DATASET, "inputs": DATASET["inputs"][:2]})
    for i, url in enumerate(INPUTS[:2]):
        commit_part(donor, url, shard_table(f"s{i}", 4, seed=i))
    finalize(donor)
    view = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    adopt_from_other_caches(view, INPUTS)
    for i in (2, 3):
        commit_part(view, INPUTS[i], shard_table(f"s{i}", 4, seed=i))
    finalize(view)
    before = load_all(view)

    adopted = remove_part(view, shard_name(INPUTS[0]))  # the donor's file: it stays, the donor names it
    assert adopted["named_by"] == [donor.id] and adopted["deleted"] is None
    own = remove_part(view, shard_name(INPUTS[3]))
    assert own["named_by"] == [] and own["deleted"] == view.file_url(own["record"])
    with pytest.raises(CacheError, match="no committed part named 'nope'.*cache show"):
        remove_part(view, "nope")
    partial = EmbeddingCache.open(view.url)
    assert not partial.complete and partial.committed_inputs() == {INPUTS[1], INPUTS[2]}
    assert verify(donor) == [] and load_all(donor).keys == before.keys[:8]

    assert adopt_from_other_caches(partial, [INPUTS[0], INPUTS[3]]) == {INPUTS[0]: donor.id}  # what precompute does
    commit_part(partial, INPUTS[3], shard_table("s3", 4, seed=3))
    finalize(partial)
    again = load_all(partial)
    assert again.keys == before.keys and np.array_equal(again.embeddings.numpy(), before.embeddings.numpy())
    assert verify(partial) == []


def test_finalize_removes_a_rewritten_parts_old_file_unless_another_cache_names_it(tmp_path):
    """Finalize rewrites parts holding later copies of a key; each old file goes, but one that another
    cache under the root adopted (its record names it) stays, and both caches read and verify clean."""
    from litpipe.store.sharing import adopt_from_other_caches

    root = tmp_path / "store"
    cache = EmbeddingCache.open_or_create(str(root), ENCODER, DATASET)
    commit_part(cache, INPUTS[0], shard_table("s0", 3))
    for i in (1, 2):
        table = shard_table(f"s{i}", 3, seed=i)
        commit_part(cache, INPUTS[i], table.set_column(0, "key", pa.array([f"s{i}/0", f"s0/{i}", f"s{i}/2"])))
    other = EmbeddingCache.open_or_create(str(root), ENCODER, {**DATASET, "inputs": DATASET["inputs"][1:2]})
    assert adopt_from_other_caches(other, [INPUTS[1]]) == {INPUTS[1]: cache.id}
    old = {r["input"]: root / cache.id / r["path"] for r in cache.parts()}
    finalize(cache)
    new = {r["input"]: root / cache.id / r["path"] for r in cache.parts()}
    assert [url for url in INPUTS[:3] if new[url] != old[url]] == INPUTS[1:3]
    assert old[INPUTS[1]].exists() and not old[INPUTS[2]].exists() and old[INPUTS[0]].exists()
    assert load_all(cache).keys == ["s0/0", "s0/1", "s0/2", "s1/0", "s1/2", "s2/0", "s2/2"] and verify(cache) == []
    finalize(other)
    assert load_all(other).keys == ["s1/0", "s0/1", "s1/2"] and verify(other) == []


def test_a_format_1_cache_reads_as_it_is_and_lends_its_shards(tmp_path):
    """Format 2 added records that name another cache's file; a format-1 cache (records without `owner`)
    is read in place, never re-encoded, and a grown dataset adopts its shards."""
    from litpipe.store.sharing import adopt_from_other_caches

    root = str(tmp_path / "store")
    old = EmbeddingCache.open_or_create(root, ENCODER, {**DATASET, "inputs": DATASET["inputs"][:2]})
    for i, url in enumerate(INPUTS[:2]):
        commit_part(old, url, shard_table(f"s{i}", 3, seed=i))
    manifest = finalize(old)
    assert all("owner" not in r for r in old.parts())
    (tmp_path / "store" / old.id / "manifest.json").write_text(
        json.dumps({**manifest, "shards": list(old.parts()), "format_version": 1}))
    reopened = EmbeddingCache.open(old.url)
    assert reopened.manifest["format_version"] == 1 and verify(reopened) == []
    assert load_all(reopened).keys == [f"s{i}/{j}" for i in range(2) for j in range(3)]
    grown = EmbeddingCache.open_or_create(root, ENCODER, DATASET)
    assert adopt_from_other_caches(grown, INPUTS) == {INPUTS[0]: old.id, INPUTS[1]: old.id}


def test_finalize_keeps_a_key_repeated_across_parts_in_the_first_and_the_token_cache_follows(tmp_path):
    """The store's side of the duplicate rule: parts committed in any order, the first copy in input
    order stays; a token cache built while the cache was partial rebuilds the rewritten part's rows."""
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.store.reader import load_all
    from litpipe.train_text.token_cache import ensure_token_cache

    cache = EmbeddingCache.open_or_create(str(tmp_path), ENCODER, DATASET)
    later = shard_table("s1", 3, seed=1)
    later = later.set_column(0, "key", pa.array(["s1/0", "s0/2", "s1/2"]))  # s0/2 is in-0's too
    commit_part(cache, INPUTS[1], later)  # committed first, but in-1 comes after in-0
    commit_part(cache, INPUTS[0], shard_table("s0", 3))
    tokens = ensure_token_cache(cache, clip_tokenizer(8))
    stale = {r["name"]: r["sha256"] for r in cache.parts()}
    finalize(cache)
    assert [(r["input"], r["rows"], r.get("duplicates_dropped", 0)) for r in cache.parts()] == [
        (INPUTS[0], 3, 0), (INPUTS[1], 2, 1)]
    assert cache.errors() == [{"key": "s0/2", "input": INPUTS[1], "reason": f"duplicate key: first in {INPUTS[0]}"}]
    assert load_all(cache).keys == ["s0/0", "s0/1", "s0/2", "s1/0", "s1/2"] and verify(cache) == []
    rewritten = [r for r in cache.parts() if r["sha256"] != stale[r["name"]]]
    assert [r["input"] for r in tokens.missing()] == [r["input"] for r in rewritten] == [INPUTS[1]]
    assert ensure_token_cache(cache, clip_tokenizer(8)).missing() == []
