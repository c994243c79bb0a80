"""fsspec URLs every stage shares: expanding dataset patterns, local vs remote, and atomic replacement.

Local disk and object stores differ in what is atomic: a rename on disk, a single PUT on a store.
Every writer that must never leave a half-written file goes through `write_atomic`.
"""

from __future__ import annotations

import os
import uuid

import fsspec
from braceexpand import braceexpand

from litpipe.errors import UserError

GLOB_CHARS = "*?["


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace ranges and globs to a sorted list of existing file URLs, keeping each protocol prefix.

    Local paths come back absolute, so the same files give the same fingerprint from any cwd.
    """
    found: set[str] = set()
    for pattern in [urls] if isinstance(urls, str) else urls:
        for url in braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(url)
            try:
                matches = fs.glob(path) if any(c in path for c in GLOB_CHARS) else ([path] if fs.exists(path) else [])
            except Exception as err:
                raise access_error(url, "data.*.urls", err) or err
            if not matches:
                raise UserError(f"{url}: matches no files; check the path (and the {{000..009}} range or glob) in pipeline.yaml")
            found.update(to_url(fs, m) for m in matches)
    return sorted(found)


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


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Local disk gets plain paths and os-level atomic operations; everything else goes through fsspec."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace a file in one step, so a reader sees the old or the new bytes, never a half-written
    file: temp + rename on local disk, one PUT on object stores (where a PUT is atomic)."""
    if is_local(fs):
        os.replace(write_temp(path, data), path)
    else:
        fs.pipe_file(path, data)


def write_temp(path: str, data: bytes) -> str:
    """`data` in a new uniquely named file beside `path` (local disk); its path."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    return tmp
