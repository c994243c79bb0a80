"""Fingerprints decide reuse: they must change with anything that changes the vectors, and only then."""

import os
import threading

import fsspec
import fsspec.implementations.local
import pytest

from litpipe.config import DatasetConfig
from litpipe.errors import UserError
from litpipe.files import expand_urls, list_files
from litpipe.store.fingerprint import cache_id, dataset_fingerprint


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_expand_urls_takes_brace_ranges_and_globs_sorted_and_absolute(tmp_path, monkeypatch):
    for i in (2, 0, 1):
        _touch(tmp_path / f"shard-{i:03d}.tar")
    _touch(tmp_path / "other.txt")
    monkeypatch.chdir(tmp_path)
    expected = [str(tmp_path / f"shard-{i:03d}.tar") for i in range(3)]
    assert expand_urls("shard-{000..002}.tar") == expected
    assert expand_urls(str(tmp_path / "shard-*.tar")) == expected
    assert expand_urls(["shard-002.tar", "shard-00[01].tar", "shard-000.tar"]) == expected


def test_expand_urls_keeps_the_protocol_of_remote_urls():
    fs = fsspec.filesystem("memory")
    fs.pipe({"/fp-proto/a-0.tar": b"1", "/fp-proto/a-1.tar": b"2"})
    assert expand_urls("memory://fp-proto/a-{0..1}.tar") == ["memory:///fp-proto/a-0.tar", "memory:///fp-proto/a-1.tar"]
    assert expand_urls("memory://fp-proto/*.tar") == ["memory:///fp-proto/a-0.tar", "memory:///fp-proto/a-1.tar"]


def test_expand_urls_names_the_pattern_that_matches_nothing(tmp_path):
    _touch(tmp_path / "a-0.tar")
    with pytest.raises(UserError, match=r"a-\{0\.\.1\}|a-1\.tar.*matches no files"):
        expand_urls(str(tmp_path / "a-{0..1}.tar"))
    with pytest.raises(UserError, match="nothing-\\*.tar: matches no files"):
        expand_urls(str(tmp_path / "nothing-*.tar"))


def test_dataset_fingerprint_changes_with_input_bytes_and_column_options_but_not_classnames(tmp_path):
    _touch(tmp_path / "d-0.parquet", b"abc")
    cfg = DatasetConfig(format="parquet", urls=str(tmp_path / "d-*.parquet"), caption_column="text")
    fp = dataset_fingerprint(cfg)
    assert fp["format"] == "parquet" and fp["options"]["caption_column"] == "text"
    assert [e["url"] for e in fp["inputs"]] == [str(tmp_path / "d-0.parquet")]
    assert fp["inputs"][0]["size"] == 3 and "mtime" in fp["inputs"][0]

    assert dataset_fingerprint(cfg.model_copy(update={"classnames": ["a", "b"]})) == fp
    assert dataset_fingerprint(cfg.model_copy(update={"caption_column": "alt"})) != fp
    stat = os.stat(tmp_path / "d-0.parquet")
    (tmp_path / "d-0.parquet").write_bytes(b"abd")
    os.utime(tmp_path / "d-0.parquet", (stat.st_atime, stat.st_mtime + 5))
    assert dataset_fingerprint(cfg) != fp


def test_folder_fingerprint_covers_captions_file_and_every_visible_image(tmp_path):
    _touch(tmp_path / "imgs" / "a.png")
    _touch(tmp_path / "imgs" / "sub" / "b.jpg")
    _touch(tmp_path / "imgs" / ".DS_Store")
    _touch(tmp_path / "captions.jsonl", b'{"path": "a.png", "caption": "a"}\n')
    cfg = DatasetConfig(format="folder", urls=str(tmp_path / "imgs"), captions_file=str(tmp_path / "captions.jsonl"))
    urls = [e["url"] for e in dataset_fingerprint(cfg)["inputs"]]
    assert urls == [str(tmp_path / "captions.jsonl"), str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "sub" / "b.jpg")]
    before = dataset_fingerprint(cfg)
    _touch(tmp_path / "imgs" / "c.png")
    assert dataset_fingerprint(cfg) != before


def test_s3_inputs_are_fingerprinted_by_etag(s3_root):
    fs = fsspec.filesystem("s3")
    fs.pipe(f"{s3_root}/s-0.tar", b"one")
    fp = dataset_fingerprint(DatasetConfig(format="webdataset", urls=f"{s3_root}/s-{{0..0}}.tar"))
    assert fp["inputs"][0]["url"] == f"{s3_root}/s-0.tar" and fp["inputs"][0]["etag"]
    fs.pipe(f"{s3_root}/s-0.tar", b"two")
    assert dataset_fingerprint(DatasetConfig(format="webdataset", urls=f"{s3_root}/s-0.tar")) != fp


def test_cache_id_is_stable_under_key_order_and_changes_with_either_fingerprint():
    enc = {"model": "m", "preprocess": {"image_size": 224, "mean": [0.5, 0.5, 0.5]}}
    data = {"format": "webdataset", "options": {}, "inputs": [{"url": "a", "size": 1, "mtime": 2.0}]}
    assert cache_id(enc, data) == cache_id({"preprocess": {"mean": [0.5, 0.5, 0.5], "image_size": 224}, "model": "m"}, data)
    assert len(cache_id(enc, data)) == 16
    assert cache_id({**enc, "preprocess": {"image_size": 256, "mean": [0.5] * 3}}, data) != cache_id(enc, data)
    assert cache_id(enc, {**data, "inputs": []}) != cache_id(enc, data)


class CountingLocal(fsspec.implementations.local.LocalFileSystem):
    """Local files that count the metadata requests made of them (a listing's own stats aside)."""

    protocol = "counting"
    calls: dict = {}
    inside = threading.local()  # listing threads run beside HEAD threads

    def ls(self, path, detail=True, **kwargs):
        self.calls["ls"] = self.calls.get("ls", 0) + 1
        self.inside.listing = True
        try:
            return super().ls(path, detail=detail, **kwargs)
        finally:
            self.inside.listing = False

    def info(self, path, **kwargs):
        if not getattr(self.inside, "listing", False):
            self.calls["info"] = self.calls.get("info", 0) + 1
        return super().info(path, **kwargs)


def test_inputs_are_listed_once_per_folder_not_requested_once_per_file(tmp_path, monkeypatch):
    fsspec.register_implementation("counting", CountingLocal, clobber=True)
    monkeypatch.setattr(CountingLocal, "calls", {})
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    for i in range(60):
        (tmp_path / "big" / f"s-{i:03d}.tar").write_bytes(b"x" * i)
    for i in range(3):
        (tmp_path / "small" / f"t-{i}.tar").write_bytes(b"y")
    patterns = [f"counting://{tmp_path}/big/s-{{000..059}}.tar", f"counting://{tmp_path}/small/t-{{0..2}}.tar"]
    found = list_files(patterns)
    assert CountingLocal.calls == {"ls": 1, "info": 3}  # one listing of the big folder, a HEAD each for 3 files
    reference_fs = fsspec.filesystem("file")
    assert list(found) == sorted(found) and len(found) == 63
    for url, info in found.items():
        expected = reference_fs.info(url.removeprefix("counting://"))
        assert (info["size"], info["mtime"]) == (expected["size"], expected["mtime"]), url
    with pytest.raises(UserError, match="s-060.tar: matches no files"):
        list_files(f"counting://{tmp_path}/big/s-{{000..060}}.tar")


def test_s3_inputs_are_one_listing_per_prefix(s3_root):
    import s3fs

    class CountingS3(s3fs.S3FileSystem):
        calls: dict = {}

        async def _ls(self, path, *args, **kwargs):
            self.calls["ls"] = self.calls.get("ls", 0) + 1
            return await super()._ls(path, *args, **kwargs)

        async def _info(self, path, *args, **kwargs):
            self.calls["info"] = self.calls.get("info", 0) + 1
            return await super()._info(path, *args, **kwargs)

    fs = fsspec.filesystem("s3")
    fs.pipe({f"{s3_root}/shards/s-{i:03d}.tar".removeprefix("s3://"): b"z" * (i + 1) for i in range(40)})
    fsspec.register_implementation("s3", CountingS3, clobber=True)
    try:
        found = list_files(f"{s3_root}/shards/s-{{000..039}}.tar")
    finally:
        fsspec.register_implementation("s3", s3fs.S3FileSystem, clobber=True)
    assert CountingS3.calls == {"ls": 1}
    assert [info["size"] for info in found.values()] == list(range(1, 41)) and all(info["etag"] for info in found.values())


def test_braces_may_reach_into_the_protocol(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe({"/braces-a/s.tar": b"a", "/braces-b/s.tar": b"bb"})
    _touch(tmp_path / "s.tar", b"ccc")
    found = list_files("{memory://braces-a,memory://braces-b,%s}/s.tar" % tmp_path)
    assert {url: info["size"] for url, info in found.items()} == {
        "memory:///braces-a/s.tar": 1, "memory:///braces-b/s.tar": 2, str(tmp_path / "s.tar"): 3}
