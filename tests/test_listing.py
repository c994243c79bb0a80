"""`list_files` against the way inputs were found before (one exists + one info per file), on real
filesystems: local disk, fsspec's memory filesystem, and an S3 protocol server (moto) through s3fs.

The answers must be the same; the requests must not: one listing per folder, counted where s3fs
talks to the server (botocore's events), so a return to one HEAD per file fails here.
"""

import os
import re
import uuid
from datetime import datetime

import fsspec
import pytest
from braceexpand import braceexpand
from fsspec.implementations.local import LocalFileSystem

from litpipe.errors import UserError
from litpipe.files import LISTING_MIN_FILES, file_exists, file_paths, list_files

BIG = 20  # files wanted from a folder that gets listed (more than LISTING_MIN_FILES)
SMALL = 3  # files wanted from a folder small enough for a HEAD each


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    """An empty folder URL on each kind of filesystem (the S3 server starts only for its case)."""
    if request.param == "local":
        yield str(tmp_path)
    elif request.param == "memory":
        url = f"memory://litpipe-listing-{uuid.uuid4().hex[:8]}"
        yield url
        fsspec.filesystem("memory").rm(url, recursive=True)
    else:
        yield request.getfixturevalue("s3_root")


def write(files: dict[str, bytes]) -> None:
    """Write URL -> bytes, one batched call per filesystem (s3fs PUTs a dict concurrently)."""
    fs, _ = fsspec.core.url_to_fs(next(iter(files)))
    paths = {fsspec.core.url_to_fs(url)[1]: data for url, data in files.items()}
    for folder in {fs._parent(path) for path in paths}:
        fs.makedirs(folder, exist_ok=True)
    fs.pipe(paths)


def two_folders(root: str) -> None:
    """`big/` with more files than LISTING_MIN_FILES (listed), `small/` with fewer (HEADs), sizes all different."""
    files = {f"{root}/big/s-{i:03d}.tar": b"b" * (i + 1) for i in range(BIG)}
    files.update({f"{root}/small/t-{i}.tar": b"s" * (100 + i) for i in range(SMALL)})
    write(files)


def per_file_reference(patterns: list[str]) -> dict[str, dict]:
    """What the code before `list_files` found: braceexpand, then per URL a glob or an exists, and
    an info per file, on a fresh cache."""
    found = {}
    for pattern in patterns:
        for url in braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(url)
            fs.invalidate_cache()
            paths = fs.glob(path) if any(c in path for c in "*?[") else [path] if fs.exists(path) else []
            for name in paths:
                info = fs.info(name)
                key = os.path.abspath(name) if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(name)
                if info.get("ETag"):
                    found[key] = {"size": info["size"], "etag": info["ETag"].strip('"')}
                else:
                    mtime = info.get("mtime", info.get("created"))
                    found[key] = {"size": info["size"], "mtime": mtime.timestamp() if isinstance(mtime, datetime) else mtime}
    return dict(sorted(found.items()))


@pytest.mark.parametrize("patterns", [
    ["{root}/big/s-{{000..%03d}}.tar" % (BIG - 1)],
    ["{root}/small/t-{{0..%d}}.tar" % (SMALL - 1)],
    ["{root}/big/s-*.tar"],
    ["{root}/{{big,small}}/*.tar"],
    ["{root}/small/t-2.tar", "{root}/big/s-00[0-4].tar", "{root}/big/s-{{003..012}}.tar", "{root}/small/t-{{0..1}}.tar",
     "{root}/small/t-2.tar"],
], ids=["range-listed", "range-heads", "glob", "brace-and-glob", "mix-with-duplicates"])
def test_same_files_and_markers_as_one_request_per_file(root, patterns):
    two_folders(root)
    patterns = [p.format(root=root) for p in patterns]
    found = list_files(patterns)
    assert found == per_file_reference(patterns)
    assert list(found) == sorted(found) and len(found) == len(set(found))
    if "://" in root:
        assert all(url.startswith(root.split("://")[0] + "://") for url in found)


def test_relative_local_paths_come_back_absolute(tmp_path, monkeypatch):
    two_folders(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    patterns = [f"big/s-{{000..{BIG - 1:03d}}}.tar", "small/t-*.tar"]
    found = list_files(patterns)
    assert list(found) == [str(tmp_path / "big" / f"s-{i:03d}.tar") for i in range(BIG)] + \
        [str(tmp_path / "small" / f"t-{i}.tar") for i in range(SMALL)]
    assert found == per_file_reference([str(tmp_path / p) for p in patterns])


@pytest.mark.parametrize("missing", ["{root}/big/s-{{000..%03d}}.tar" % BIG, "{root}/small/t-{{0..%d}}.tar" % SMALL,
                                     "{root}/small/nothing-*.tar", "{root}/elsewhere/t-0.tar",
                                     "{root}/elsewhere/s-{{000..%03d}}.tar" % (BIG - 1)],
                         ids=["listed-folder", "head-folder", "glob", "missing-folder", "missing-folder-listed"])
def test_a_url_that_matches_nothing_is_named_with_the_fix(root, missing):
    two_folders(root)
    pattern = missing.format(root=root)
    first_missing = [url for url in braceexpand(pattern) if not per_file_reference([url])][0]
    message = f"{first_missing}: matches no files; check the path and its {{000..009}} range or glob"
    with pytest.raises(UserError, match=re.escape(message)):
        list_files(pattern)


@pytest.fixture
def s3_requests(s3_server):
    """Counts of the S3 API calls s3fs makes ({"HeadObject": n, "ListObjectsV2": m, ...}), seen on
    the botocore client that `list_files` gets for an s3:// URL."""
    fs = fsspec.filesystem("s3")
    counts: dict[str, int] = {}

    def count(model, **kwargs):
        counts[model.name] = counts.get(model.name, 0) + 1

    fs.s3.meta.events.register("before-call.s3", count)
    yield counts
    fs.s3.meta.events.unregister("before-call.s3", count)


def test_s3_is_one_listing_per_prefix_not_a_head_per_object(s3_root, s3_requests):
    assert BIG > LISTING_MIN_FILES > SMALL
    folders = {"a": 40, "b": 25, "c": BIG}
    write({f"{s3_root}/{name}/s-{i:03d}.tar": b"x" * (i + 1) for name, n in folders.items() for i in range(n)})
    write({f"{s3_root}/small/t-{i}.tar": b"y" for i in range(SMALL)})
    assert fsspec.core.url_to_fs(s3_root)[0] is fsspec.filesystem("s3")  # the counted client is the one used
    s3_requests.clear()
    found = list_files([f"{s3_root}/{name}/s-{{000..{n - 1:03d}}}.tar" for name, n in folders.items()] +
                       [f"{s3_root}/small/t-{{0..{SMALL - 1}}}.tar"])
    assert len(found) == sum(folders.values()) + SMALL
    assert s3_requests == {"ListObjectsV2": len(folders), "HeadObject": SMALL}

    fsspec.filesystem("s3").invalidate_cache()
    s3_requests.clear()
    assert len(list_files(f"{s3_root}/a/s-*.tar")) == 40
    assert s3_requests == {"ListObjectsV2": 1}


@pytest.mark.parametrize("pattern", ["{root}/big/s-{{000..%03d}}.tar" % (BIG - 1), "{root}/small/t-{{0..%d}}.tar" % SMALL,
                                     "{root}/{{big,small}}/*.tar"], ids=["listed-folder", "head-folder", "glob"])
def test_s3_sees_what_another_writer_changed_after_this_process_listed(s3_root, pattern):
    """s3fs caches listings per process and answers info() from them: a shard rewritten or added by
    another client since must still change the answer, or a stale cache would be reused."""
    two_folders(s3_root)
    fs = fsspec.filesystem("s3")
    for folder in ("big", "small"):
        fs.ls(f"{s3_root}/{folder}")  # anything in this process listing the folders earlier fills the cache
    other = fsspec.filesystem("s3", skip_instance_cache=True)
    other.pipe({f"{s3_root}/big/s-001.tar": b"rewritten by another writer", f"{s3_root}/small/t-1.tar": b"rewritten",
                f"{s3_root}/small/t-{SMALL}.tar": b"added"})
    pattern = pattern.format(root=s3_root)
    assert list_files(pattern) == per_file_reference([pattern])


def test_file_paths_lists_as_ls_does_and_on_s3_keeps_no_listing(root):
    """A cache's commits/ is listed at every look, and s3fs's `ls` makes and caches an info dict an object
    (13 MB of a run's driver at 10,000 parts): `file_paths` pages through it keeping the paths alone."""
    files = {f"{root}/commits/r-{i:04d}.json": b"{}" for i in range(1500)}  # two pages of S3's 1,000
    files[f"{root}/commits/sub/x.json"] = b"{}"
    write(files)
    fs, folder = fsspec.core.url_to_fs(f"{root}/commits")
    fs.invalidate_cache()
    assert sorted(file_paths(fs, folder)) == sorted(fs.ls(folder, detail=False))
    fs.invalidate_cache()
    assert len(file_paths(fs, folder)) == 1501 and folder not in getattr(fs, "dircache", {})
    assert file_paths(fs, folder + "-none") == []


def test_a_file_missing_on_s3_is_answered_in_one_request_holding_nothing_of_its_caller(s3_root):
    """`file_exists` takes the 404 as a value: raised through fsspec's `sync`, the FileNotFoundError sat in a
    reference cycle with its traceback, keeping the caller's frames (an encoder actor's decoded part) until
    the next full garbage collection, 100 MB in the rehearsal's actor."""
    import gc
    import weakref

    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{s3_root}/there.json", b"{}")

    class Part:
        pass

    def commit(name: str) -> tuple[bool, weakref.ref]:
        part = Part()
        return file_exists(fs, f"{s3_root}/{name}"), weakref.ref(part)

    gc.disable()
    try:
        answers = [commit("there.json"), commit("none.json")]
        assert [(found, held()) for found, held in answers] == [(True, None), (False, None)]
    finally:
        gc.enable()
