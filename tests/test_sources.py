"""precompute/sources.py: the three input formats, read from real files (local and fsspec memory://)."""

import json

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from litpipe.config import DatasetConfig
from litpipe.errors import UserError
from litpipe.sources import SHARD_ERROR_KEY, TransientReadError, list_shards, read_shard
from precompute_samples import encode_image, image_bytes, sample_members, write_tar

from litpipe.precompute.read import read_parts


def webdataset(urls, **kw):
    return DatasetConfig(format="webdataset", urls=urls, **kw)


def test_tar_in_img2dataset_layout_gives_key_image_captions_label_metadata(tmp_path):
    members = sample_members("a/000", image_bytes(0), "one\ntwo", label=3) + sample_members("a/001", image_bytes(1), "x", ext="jpg")
    write_tar(tmp_path / "s.tar", members)
    ds = webdataset(str(tmp_path / "*.tar"))
    (url,) = list_shards(ds)
    first, second = read_shard(ds, url)
    assert (first.key, first.captions, first.label, first.metadata) == ("a/000", ["one\ntwo"], 3, {"source": "test"})
    assert first.image == image_bytes(0) and first.error is None
    assert (second.key, second.label, second.image) == ("a/001", None, image_bytes(1))


def test_a_missing_image_is_a_sample_error_and_a_missing_caption_an_uncaptioned_sample(tmp_path):
    write_tar(tmp_path / "s.tar", sample_members("k0", image_bytes(0), None) + sample_members("k1", None, "cap")
              + sample_members("k2", image_bytes(2), "ok"))
    samples = read_shard(webdataset(str(tmp_path / "s.tar")), str(tmp_path / "s.tar"))
    assert [(s.key, (s.error or "").split(" (")[0], s.captions) for s in samples] == [
        ("k0", "", []), ("k1", "no image", []), ("k2", "", ["ok"])]


def test_truncated_tar_keeps_every_complete_sample_and_records_the_cut(tmp_path):
    members = [m for i in range(4) for m in sample_members(f"k{i}", image_bytes(i, size=(64, 64)), f"c{i}")]
    write_tar(tmp_path / "s.tar", members)
    data = (tmp_path / "s.tar").read_bytes()
    cut = data.index(image_bytes(2, size=(64, 64))) + 100  # inside the image of sample k2
    (tmp_path / "s.tar").write_bytes(data[:cut])
    samples = read_shard(webdataset(str(tmp_path / "s.tar")), str(tmp_path / "s.tar"))
    assert [s.key for s in samples if s.error is None] == ["k0", "k1"]
    assert [(s.key, s.error.split(":")[0]) for s in samples if s.error] == [("k2", "truncated shard")]


def test_unreadable_shard_is_one_error_record(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"\x00garbage" * 100)
    (sample,) = read_shard(webdataset(str(tmp_path / "bad.tar")), str(tmp_path / "bad.tar"))
    assert sample.key == SHARD_ERROR_KEY and sample.error.startswith("unreadable shard")


def test_parquet_in_img2dataset_layout_with_extra_columns_as_metadata():
    fs = fsspec.filesystem("memory")
    table = pa.table({"key": ["x0", "x1"], "jpg": [image_bytes(0), image_bytes(1)], "caption": ["c0", "c1"],
                      "url": ["http://a", "http://b"], "width": [40, 40]})
    with fs.open("/pq/part-0.parquet", "wb") as f:
        pq.write_table(table, f)
    ds = DatasetConfig(format="parquet", urls="memory://pq/*.parquet")
    (url,) = list_shards(ds)
    samples = read_shard(ds, url)
    assert [(s.key, s.captions, s.image) for s in samples] == [("x0", ["c0"], image_bytes(0)), ("x1", ["c1"], image_bytes(1))]
    assert samples[0].metadata == {"url": "http://a", "width": 40}


def test_parquet_in_hugging_face_layout_with_image_struct_caption_lists_and_labels(tmp_path):
    images = [{"bytes": image_bytes(i), "path": f"{i}.png"} for i in range(2)]
    table = pa.table({"image": images, "sentences": [["a", "b"], ["c"]], "cls": [4, 5]})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet")
    ds = DatasetConfig(format="parquet", urls=str(tmp_path / "*.parquet"), caption_column="sentences", label_column="cls")
    samples = read_shard(ds, list_shards(ds)[0])
    assert [(s.key, s.captions, s.label) for s in samples] == [("train-00000-of-00001/0", ["a", "b"], 4),
                                                               ("train-00000-of-00001/1", ["c"], 5)]
    assert samples[1].image == image_bytes(1)


def test_folder_with_jsonl_captions_is_split_into_row_range_shards(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    rows = []
    for i in range(5):
        (tmp_path / "img" / "sub" / f"{i}.png").write_bytes(image_bytes(i))
        rows.append({"path": f"sub/{i}.png", "captions": [f"c{i}", "d"], "label": i})
    rows.append({"path": "sub/missing.png", "caption": "gone"})
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = DatasetConfig(format="folder", urls=str(tmp_path / "img"), captions_file=str(tmp_path / "captions.jsonl"), shard_rows=4)
    shards = list_shards(ds)
    assert len(shards) == 2
    samples = [s for url in shards for s in read_shard(ds, url)]
    assert [(s.key, s.label) for s in samples[:5]] == [(f"sub/{i}", i) for i in range(5)]
    assert samples[0].captions == ["c0", "d"] and samples[4].image == image_bytes(4)
    assert samples[5].key == "sub/missing" and samples[5].error.startswith("image file missing")


def test_folder_with_csv_captions_reads_repeated_caption_columns(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "caps.csv").write_text("path,caption,caption_2,label\na.png,first,second,7\n")
    ds = DatasetConfig(format="folder", urls=str(tmp_path / "img"), captions_file=str(tmp_path / "caps.csv"))
    (sample,) = read_shard(ds, list_shards(ds)[0])
    assert (sample.key, sample.captions, sample.label) == ("a", ["first", "second"], 7)


def test_tar_shards_are_read_through_fsspec():
    fs = fsspec.filesystem("memory")
    with fs.open("/wds/shard-000000.tar", "wb") as f:
        write_tar(f, sample_members("m0", image_bytes(0), "mem"))
    ds = webdataset("memory://wds/shard-{000000..000000}.tar")
    (url,) = list_shards(ds)
    assert url.startswith("memory://")
    assert [(s.key, s.captions) for s in read_shard(ds, url)] == [("m0", ["mem"])]


def test_folder_dataset_with_two_folders_or_a_broken_captions_line_is_a_user_error_naming_it(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "caps.jsonl").write_text('{"path": "x.png", "caption": "c"}\n{"path": \n')
    two = DatasetConfig(format="folder", urls=str(tmp_path / "[ab]"), captions_file=str(tmp_path / "caps.jsonl"))
    with pytest.raises(UserError, match="urls must name one path.*matches 2"):
        list_shards(two)
    with pytest.raises(UserError, match="caps.jsonl: line 2 is not valid JSON"):
        list_shards(two.model_copy(update={"urls": str(tmp_path / "a")}))


class FailingReads(fsspec.implementations.local.LocalFileSystem):
    """Local files whose reads fail after `ok_reads` successful ones (a connection that drops
    mid-shard); `fail_cat` makes whole-file reads fail too."""

    protocol = "failing"
    ok_reads, fail_cat = 0, False

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)
        budget = [self.ok_reads]

        def read(*args, _read=file.read):
            budget[0] -= 1
            if budget[0] < 0:
                raise ConnectionResetError("connection reset by peer")
            return _read(*args)

        file.read = read
        return file

    def cat_file(self, path, *args, **kwargs):
        if self.fail_cat:
            raise TimeoutError("read timed out")
        return super().cat_file(path, *args, **kwargs)


@pytest.fixture
def failing_fs(monkeypatch):
    fsspec.register_implementation("failing", FailingReads, clobber=True)
    monkeypatch.setattr(FailingReads, "ok_reads", 0)
    monkeypatch.setattr(FailingReads, "fail_cat", False)
    return FailingReads


@pytest.mark.parametrize("ok_reads", [0, 3])
def test_a_read_that_fails_is_transient_not_bad_data_whether_at_the_start_or_mid_tar(tmp_path, failing_fs, ok_reads):
    members = [m for i in range(20) for m in sample_members(f"k{i}", image_bytes(i, size=(64, 64)), f"c{i}")]
    write_tar(tmp_path / "s.tar", members)
    ds = webdataset(f"failing://{tmp_path}/s.tar")
    failing_fs.ok_reads = 10**6
    assert len(read_shard(ds, f"failing://{tmp_path}/s.tar")) == 20
    failing_fs.ok_reads = ok_reads
    with pytest.raises(TransientReadError, match="ConnectionResetError: connection reset by peer"):
        read_shard(ds, f"failing://{tmp_path}/s.tar")


def test_the_same_bytes_cut_short_on_disk_are_bad_data(tmp_path):
    members = [m for i in range(20) for m in sample_members(f"k{i}", image_bytes(i, size=(64, 64)), f"c{i}")]
    write_tar(tmp_path / "s.tar", members)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) // 2])
    samples = read_shard(webdataset(str(tmp_path / "s.tar")), str(tmp_path / "s.tar"))
    assert samples[-1].error.startswith("truncated shard") and all(s.error is None for s in samples[:-1])


def test_parquet_and_folder_read_failures_are_transient(tmp_path, failing_fs):
    pq.write_table(pa.table({"jpg": [image_bytes(0)], "txt": ["a"]}), tmp_path / "p.parquet")
    failing_fs.ok_reads = 1
    with pytest.raises(TransientReadError):
        read_shard(DatasetConfig(format="parquet", urls="x"), f"failing://{tmp_path}/p.parquet")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(image_bytes(0))
    (tmp_path / "caps.jsonl").write_text('{"path": "a.png", "caption": "c"}\n{"path": "gone.png", "caption": "d"}\n')
    folder = DatasetConfig(format="folder", urls=f"failing://{tmp_path}/img", captions_file=f"{tmp_path}/caps.jsonl")
    failing_fs.ok_reads = 100
    shard = list_shards(folder)[0]
    assert [s.error for s in read_shard(folder, shard)] == [None, "image file missing: gone.png"]  # missing = bad data
    failing_fs.fail_cat = True
    with pytest.raises(TransientReadError, match="TimeoutError"):
        read_shard(folder, shard)


def test_a_caption_with_line_breaks_is_one_caption_unless_caption_split_is_lines(tmp_path):
    """img2dataset and open_clip read one .txt (one Parquet string) as one caption; web alt-texts hold
    newlines. Several captions per image come from a list column or `caption_split: lines`."""
    alt = "A red bicycle\nleaning on a wall\r\n"
    write_tar(tmp_path / "s.tar", sample_members("k", image_bytes(0), alt))
    pq.write_table(pa.table({"jpg": [image_bytes(0)], "caption": [alt], "key": ["p"]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"jpg": [image_bytes(0)], "caption": [["one\nline", "two"]], "key": ["q"]}), tmp_path / "l.parquet")
    tar, table, listed = (webdataset(str(tmp_path / "s.tar")), DatasetConfig(format="parquet", urls=str(tmp_path / "p.parquet")),
                          DatasetConfig(format="parquet", urls=str(tmp_path / "l.parquet")))
    assert read_shard(tar, str(tmp_path / "s.tar"))[0].captions == ["A red bicycle\nleaning on a wall"]
    assert read_shard(table, str(tmp_path / "p.parquet"))[0].captions == ["A red bicycle\nleaning on a wall"]
    assert read_shard(listed, str(tmp_path / "l.parquet"))[0].captions == ["one\nline", "two"]  # a list: its items
    lines = {"caption_split": "lines"}
    assert read_shard(tar.model_copy(update=lines), str(tmp_path / "s.tar"))[0].captions == ["A red bicycle", "leaning on a wall"]
    assert read_shard(table.model_copy(update=lines), str(tmp_path / "p.parquet"))[0].captions == ["A red bicycle",
                                                                                                  "leaning on a wall"]


def test_captions_that_are_not_utf8_are_read_as_cp1252_kept_and_flagged(tmp_path):
    members = [("lat.png", image_bytes(0)), ("lat.txt", "café crème".encode("latin-1")),
               ("win.png", image_bytes(1)), ("win.txt", "\u201cquoted\u201d \u2013 50\u20ac".encode("cp1252")),
               ("utf.png", image_bytes(2)), ("utf.txt", "naïve 😀".encode("utf-8-sig")),
               ("odd.png", image_bytes(3)), ("odd.txt", b"x\x81y")]  # undefined in cp1252: Latin-1 takes it
    write_tar(tmp_path / "s.tar", members)
    samples = read_shard(webdataset(str(tmp_path / "s.tar")), str(tmp_path / "s.tar"))
    assert [(s.key, s.captions, s.legacy_text) for s in samples] == [
        ("lat", ["café crème"], True), ("win", ["\u201cquoted\u201d \u2013 50\u20ac"], True), ("utf", ["naïve 😀"], False),
        ("odd", ["x\x81y"], True)]
    pq.write_table(pa.table({"jpg": [image_bytes(0)], "caption": pa.array(["café".encode("latin-1")], pa.binary())}),
                   tmp_path / "b.parquet")
    (sample,) = read_shard(DatasetConfig(format="parquet", urls="x"), str(tmp_path / "b.parquet"))
    assert (sample.captions, sample.legacy_text) == (["café"], True)


def test_a_key_repeated_in_a_shard_keeps_its_first_sample_and_names_the_shard(tmp_path):
    write_tar(tmp_path / "s.tar", sample_members("a", image_bytes(0), "first") + sample_members("b", image_bytes(1), "b")
              + sample_members("a", image_bytes(2), "again"))
    samples = read_shard(webdataset(str(tmp_path / "s.tar")), str(tmp_path / "s.tar"))
    assert [(s.key, s.captions, s.error) for s in samples] == [
        ("a", ["first"], None), ("b", ["b"], None), ("a", [], f"duplicate key: first in {tmp_path / 's.tar'}")]


class CountingReads(fsspec.implementations.local.LocalFileSystem):
    """Local files that count the bytes read from them."""

    protocol = "counting"
    read_bytes = 0

    def _open(self, path, mode="rb", **kwargs):
        file = super()._open(path, mode, **kwargs)

        def read(*args, _read=file.read):
            data = _read(*args)
            CountingReads.read_bytes += len(data)
            return data

        file.read = read
        return file


def test_a_read_task_streams_its_shard_holding_about_one_part(tmp_path, monkeypatch):
    """The task yields part 0 having read about one part of a 10 MB shard, not the whole shard."""
    import numpy as np
    from PIL import Image

    from litpipe.models.cpu_pixels import CpuPixels

    fsspec.register_implementation("counting", CountingReads, clobber=True)
    monkeypatch.setattr(CountingReads, "read_bytes", 0)
    noise = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (128, 128, 3), np.uint8)) for i in range(4)]
    images = [encode_image(image, "PNG") for image in noise]  # ~50 kB each: noise does not compress
    members = [m for i in range(200) for m in sample_members(f"k{i:03d}", images[i % 4], f"c{i}")]
    write_tar(tmp_path / "big.tar", members)
    size, per_part = (tmp_path / "big.tar").stat().st_size, 10
    url = f"counting://{tmp_path}/big.tar"
    row = pa.table({"dataset": ["d"], "input": [url], "skip": [[]]})
    parts = read_parts(row, {"d": webdataset(url)}, {"d": per_part}, CpuPixels("tensor", (32, 32), []), 10**8, False,
                       yield_cpu=False, read_retries=0)
    next(parts)
    part_bytes = size / 200 * per_part
    assert CountingReads.read_bytes < 2 * part_bytes, (CountingReads.read_bytes, part_bytes, size)
    assert 1 + sum(1 for _ in parts) == 20


def test_a_read_task_retries_a_failed_read_itself_and_skips_the_parts_it_already_yielded(tmp_path, failing_fs, monkeypatch):
    from litpipe.models.cpu_pixels import CpuPixels
    from litpipe.precompute import read

    monkeypatch.setattr(read, "RETRY_BACKOFF_S", 0.01)
    members = [m for i in range(20) for m in sample_members(f"k{i:02d}", image_bytes(i, size=(64, 64)), f"c{i}")]
    write_tar(tmp_path / "s.tar", members)
    url = f"failing://{tmp_path}/s.tar"
    row = pa.table({"dataset": ["d"], "input": [url], "skip": [[]]})
    args = ({"d": webdataset(url)}, {"d": 5}, CpuPixels("tensor", (32, 32), []), 10**8, False)
    failing_fs.ok_reads = 12  # the first connection drops after part 0, in part 1

    def connection_back_after(parts):
        for table in parts:
            failing_fs.ok_reads = 10**6  # the next open reads the whole shard
            yield table

    got = [t["part"][0].as_py() for t in connection_back_after(read_parts(row, *args, yield_cpu=False, read_retries=1))]
    assert got == [0, 1, 2, 3]  # part 0 once: the second reading skipped it
    failing_fs.ok_reads = 12
    with pytest.raises(TransientReadError):
        list(read_parts(row, *args, yield_cpu=False, read_retries=2))  # every reading drops in part 1
