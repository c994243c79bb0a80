"""fsspec URLs every stage shares: expanding dataset patterns, local vs remote, and atomic replacement.

Local disk and object stores differ in what is atomic: a rename on disk, a single PUT on a store.
Every writer that must never leave a half-written file goes through `write_atomic`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import fsspec
from fsspec.asyn import sync
from braceexpand import braceexpand

from litpipe.errors import UserError

GLOB_CHARS = "*?["
LISTING_THREADS = 16  # folders listed at once: requests to an object store are latency-bound
TEMP_MARK = ".tmp-"  # in the name of a file written beside its target, until its rename (`write_temp`)
LISTING_MIN_FILES = 16  # fewer wanted files than this in one folder: a HEAD each, not a listing


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace ranges and globs to a sorted list of existing file URLs (see `list_files`)."""
    return list(list_files(urls))


def list_files(urls: str | list[str]) -> dict[str, dict]:
    """Brace ranges and globs -> {URL: {"size", and "etag" or "mtime"}} of the files (or folders)
    they name, sorted by URL.

    One listing per folder, folders in parallel, not one request per file: 100,000 shards on an
    object store are a hundred list pages, not 100,000 HEADs. Local paths come back absolute, so the
    same files give the same fingerprint from any cwd; other URLs keep their protocol prefix.
    """
    folders: dict[tuple, list[tuple[str, str]]] = {}  # (filesystem, folder) -> [(url, path)] wanted there
    globs = []
    for url, fs, path in _expand(urls):
        if any(c in path for c in GLOB_CHARS):
            globs.append((url, fs, path))
        else:
            folders.setdefault((fs, posixpath.dirname(path.rstrip("/"))), []).append((url, path))
    for fs in {id(fs): fs for fs in [g[1] for g in globs] + [f for f, _ in folders]}.values():
        fs.invalidate_cache()  # some filesystems (s3fs) answer listings and infos from a per-process cache
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        listed = [pool.submit(_glob, url, fs, path) for url, fs, path in globs]
        listed += [pool.submit(_in_folder, fs, folder, wanted) for (fs, folder), wanted in folders.items()]
        found = {}
        for future in listed:
            found.update(future.result())
    return dict(sorted(found.items()))


def _expand(urls: str | list[str]):
    """(url, filesystem, path) of every brace expansion. The filesystem is resolved once per
    pattern, not once per expanded name (100,000 names would cost seconds), unless the braces
    hold what resolving a path rewrites (a protocol, `..`, `//`, `./`)."""
    for pattern in [urls] if isinstance(urls, str) else urls:
        braces = pattern.partition("{")[2]
        if not any(s in braces for s in ("://", "..", "//", "./")):  # path normalisation cannot reach into them
            fs, base = fsspec.core.url_to_fs(pattern)
            yield from ((url, fs, path) for url, path in zip(braceexpand(pattern), braceexpand(base)))
        else:
            for url in braceexpand(pattern):
                yield (url, *fsspec.core.url_to_fs(url))


def _glob(url: str, fs, path: str) -> dict[str, dict]:
    infos = _reach(url, lambda: fs.glob(path, detail=True))
    if not infos:
        raise _no_files(url)
    return {to_url(fs, name): file_info(info) for name, info in infos.items()}


def _in_folder(fs, folder: str, wanted: list[tuple[str, str]]) -> dict[str, dict]:
    """The wanted files of one folder: one listing, or a HEAD each when few are wanted (a listing of
    a large folder for three of its files costs more than three HEADs)."""
    if len(wanted) < LISTING_MIN_FILES:
        infos = {}
        for url, path in wanted:
            infos[path] = _reach(url, lambda path=path: _info_or_none(fs, path))
    else:
        listing = _reach(wanted[0][0], lambda: ls_or_empty(fs, folder, detail=True))
        by_name = {info["name"].rstrip("/"): info for info in listing}  # listed names are paths, as ours are
        infos = {path: by_name.get(path.rstrip("/")) for _, path in wanted}
    for url, path in wanted:
        if infos[path] is None:
            raise _no_files(url)
    return {to_url(fs, path): file_info(infos[path]) for _, path in wanted}


def ls_or_empty(fs, folder: str, detail: bool = False) -> list:
    """`fs.ls(folder)`, or nothing where the folder does not exist (object stores have no empty folders)."""
    try:
        return fs.ls(folder, detail=detail)
    except FileNotFoundError:
        return []


def file_paths(fs, folder: str) -> list[str]:
    """The paths under `folder` now (`ls_or_empty`'s, without details), keeping no listing behind. On S3
    a page of the listing at a time, keeping the paths alone: s3fs's `ls` makes an info dict an object
    first, 1.2 kB each, which stayed in a run's driver as 13 MB at 10,000 parts (docs/benchmarks.md). Its
    paging (`_iterdir`) is not public API, so any other store, or an s3fs without it, is listed with `ls`
    and its listing cache emptied before (a stale listing) and after (a dict an entry)."""
    if not (getattr(fs, "async_impl", False) and hasattr(fs, "_iterdir") and "s3" in fs.protocol):
        fs.invalidate_cache(folder)
        try:
            return ls_or_empty(fs, folder)
        finally:
            fs.invalidate_cache(folder)
    bucket, key, _ = fs.split_path(folder)

    async def paths():
        return [entry["name"] async for entry in fs._iterdir(bucket, prefix=key.rstrip("/") + "/")]

    return sync(fs.loop, paths)


def _info_or_none(fs, path: str) -> dict | None:
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None


def _reach(url: str, call):
    """`call()`, with a store that refuses us or cannot be reached turned into the fix."""
    try:
        return call()
    except Exception as err:
        raise access_error(url, "data.*.urls", err) or err


class NoFilesError(UserError):
    """A path, glob or brace range that names no file; the caller prefixes the config key that gave it."""


def _no_files(url: str) -> UserError:
    return NoFilesError(f"{url}: matches no files; check the path and its {{000..009}} range or glob")


def file_info(info: dict) -> dict:
    """Size plus the store's change marker: the ETag on object stores, else the modification time."""
    entry = {"size": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        entry["etag"] = str(etag).strip('"')
        return entry
    mtime = info.get("mtime", info.get("LastModified", info.get("created")))
    entry["mtime"] = mtime.timestamp() if isinstance(mtime, datetime) else mtime
    return entry


def access_error(url: str, key: str, err: Exception) -> UserError | None:
    """The fix for a store that refuses us or cannot be reached, as a UserError naming the config
    `key`; None for other errors. Matched by class name, so no store client need be installed."""
    names = {cls.__name__ for cls in type(err).__mro__}
    text = f"{type(err).__name__}: {err}"
    if names & {"NoCredentialsError", "PartialCredentialsError"} or "credentials" in str(err).lower():
        return UserError(f"{key}: {url}: no usable credentials were found ({text}); set AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) where litpipe and its Ray "
                         "workers run, or pass them in fsspec's config")
    if names & {"PermissionError", "AccessDenied", "ClientAuthenticationError"}:
        return UserError(f"{key}: {url}: access denied ({text}); check the credentials' rights on this bucket/prefix")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionError",
                "ServerTimeoutError"}:
        return UserError(f"{key}: {url}: cannot connect to the store ({text}); check the endpoint "
                         "(AWS_ENDPOINT_URL or fsspec's endpoint_url), the network, or the URL's scheme")
    return None


def check_reachable(url: str, key: str) -> None:
    """Fail early, with the fix, when `url`'s store cannot be listed: before any work starts."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.exists(path)
    except Exception as err:
        raise access_error(url, key, err) or err


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A filesystem path back to a URL: plain absolute paths for local files, protocol://path otherwise."""
    if is_local(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def content_digest(path: str) -> str:
    """"sha256:<hex>" of a local file's bytes, or of a folder's files (relative names and bytes, hidden
    files excepted): what names a checkpoint or a model folder in an identity, whatever path spells it.

    Remembered per (path, size, mtime) in this process: a multi-GB checkpoint is hashed once."""
    path = os.path.realpath(path)
    files = [path]
    if os.path.isdir(path):
        files = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [os.path.join(folder, name) for name in names if not name.startswith(".")]
        files.sort()
    digest = hashlib.sha256()
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.path.relpath(file, path)}|{_file_sha256(file, stat.st_size, stat.st_mtime_ns)}|".encode())
    return f"sha256:{digest.hexdigest()}"


@functools.lru_cache(maxsize=1024)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def read_small(fs: fsspec.AbstractFileSystem, paths: str | list[str]):
    """`fs.cat` of small files (commit records), a request each. s3fs, whose max_concurrency is above 1
    by default, HEADs a file before reading it whole, to fetch a large one in concurrent ranges: for a
    record of a few kB that doubled the requests. A list gives {path: bytes or the exception}."""
    one_request = {"max_concurrency": 1} if getattr(fs, "max_concurrency", 1) > 1 else {}
    if isinstance(paths, str):
        return fs.cat_file(paths, **one_request)
    return fs.cat(paths, on_error="return", **one_request)


def file_exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether a small file is at `path`, in one request: fsspec's `exists` on S3 HEADs the key and, when
    it is absent, lists its prefix too (it might be a folder): two requests for every part committed."""
    if is_local(fs):
        return os.path.isfile(path)
    # The answer comes back as a value: a FileNotFoundError raised through fsspec's `sync` sits in a
    # reference cycle with its traceback, which holds this caller's frames, and an encoder actor's
    # decoded part with them, until the next full garbage collection (100 MB more in the rehearsal).
    (found,) = read_small(fs, [path]).values()
    if isinstance(found, FileNotFoundError):
        return False
    if isinstance(found, Exception):
        raise found
    return True


def make_folder(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """`makedirs`, but not on S3, whose key prefixes need no making: s3fs's only checks that the bucket is
    there, a request for every part committed or rewritten."""
    if "s3" not in fs.protocol:
        fs.makedirs(path, exist_ok=True)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disk gets plain paths and os-level atomic operations; everything else goes through fsspec."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes | Iterable[bytes]) -> None:
    """Replace a file in one step, so a reader sees the old or the new bytes, never a half-written
    file: temp + rename on local disk, one PUT (or one multipart upload) on object stores. `data` may
    come in pieces (a generator), so a large file is never held whole: it is written to a local
    temporary file first, and nothing is uploaded if making it fails."""
    if is_local(fs):
        os.replace(write_temp(path, data), path)
    elif isinstance(data, bytes):
        fs.pipe_file(path, data)
    else:
        with tempfile.NamedTemporaryFile(prefix="litpipe-upload-") as tmp:
            _write_pieces(tmp, data)
            tmp.flush()
            fs.put_file(tmp.name, path)


def write_exclusive(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create a file only if absent, atomically; False when it already exists: the store's commit
    primitive (a manifest created once, a part committed once)."""
    if is_local(fs):
        tmp = write_temp(path, data)
        try:
            os.link(tmp, path)  # fails if `path` exists, never half-written
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")  # S3 If-None-Match: *
    except OSError as err:  # FileExistsError, or a 412 under another name
        if not isinstance(err, FileExistsError) and "PreconditionFailed" not in str(err) and "412" not in str(err):
            raise
    # Read back in every case: a PUT whose reply was lost is resent by the client and answered 412
    # although it was ours; and on stores that ignore the precondition the last PUT wins. Whoever
    # reads back its own bytes (each record names a writer-unique data file) won.
    fs.invalidate_cache(path)
    return read_small(fs, path) == data


def write_temp(path: str, data: bytes | Iterable[bytes]) -> str:
    """`data` (bytes or pieces of them) in a new uniquely named file beside `path` (local disk); its path."""
    tmp = f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            _write_pieces(f, data)
    except BaseException as err:  # a full disk, or the pieces' maker failed: no half-written file stays behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise naming(err, tmp) from err
        raise
    return tmp


def _write_pieces(f, data: bytes | Iterable[bytes]) -> None:
    for chunk in [data] if isinstance(data, bytes) else data:
        f.write(chunk)


def naming(err: OSError, path: str) -> OSError:
    """`err` with the file it concerns (a failed write names none: "[Errno 28] No space left on device")."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror, path)
