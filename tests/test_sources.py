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
from precompute_samples import image_bytes, sample_members, write_tar


def webdataset(urls, **kw):
    return DatasetConfig(format="webdataset", urls=urls, **kw)


def test_tar_in_img2dataset_layout_gives_key_image_captions_label_metadata(tmp_path):
    members = sample_members("a/000", image_bytes(0), "one\ntwo", label=3) + sample_members("a/001", image_bytes(1), "x", ext="jpg")
    write_tar(tmp_path / "s.tar", members)
    ds = webdataset(str(tmp_path / "*.tar"))
    (url,) = list_shards(ds)
    first, second = read_shard(ds, url)
    assert (first.key, first.captions, first.label, first.metadata) == ("a/000", ["one", "two"], 3, {"source": "test"})
    assert first.image == image_bytes(0) and first.error is None
    assert (second.key, second.label, second.image) == ("a/001", None, image_bytes(1))


def test_missing_caption_or_image_is_a_sample_error_not_a_failure(tmp_path):
    write_tar(tmp_path / "s.tar", sample_members("k0", image_bytes(0), None) + sample_members("k1", None, "cap")
              + sample_members("k2", image_bytes(2), "ok"))
    samples = read_shard(webdataset(str(tmp_path / "s.tar")), str(tmp_path / "s.tar"))
    assert [(s.key, (s.error or "").split(" (")[0]) for s in samples] == [("k0", "no caption"), ("k1", "no image"), ("k2", "")]


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
