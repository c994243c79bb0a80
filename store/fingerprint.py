"""What a cache was made from: the dataset's input files and the id that names a cache.

A cache is reused only when both fingerprints match exactly, so everything that changes the
vectors (encoder, preprocessing, input bytes, column choices) must be in one of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime

import fsspec

from litpipe.files import expand_urls, to_url

def dataset_fingerprint(dataset_cfg) -> dict:
    """{"format", "options", "inputs": [{"url", "size", "etag" or "mtime"}]} of a `data` entry.

    For `folder`, the inputs are the captions file and every file under the folder(s), hidden
    files excepted: adding, removing or rewriting an image changes the fingerprint.
    `classnames` is left out: it is read by eval and does not change any cached vector.
    """
    options = dataset_cfg.model_dump(exclude={"format", "urls", "classnames"})
    if dataset_cfg.format == "folder":
        inputs = [_file_entry(u) for u in expand_urls(dataset_cfg.captions_file)] if dataset_cfg.captions_file else []
        for folder in expand_urls(dataset_cfg.urls):
            fs, path = fsspec.core.url_to_fs(folder)
            listing = fs.find(path, detail=True)
            for name in sorted(listing):
                if not os.path.basename(name).startswith("."):
                    inputs.append(_entry(to_url(fs, name), listing[name]))
    else:
        inputs = [_file_entry(u) for u in expand_urls(dataset_cfg.urls)]
    return {"format": dataset_cfg.format, "options": options, "inputs": inputs}


def _file_entry(url: str) -> dict:
    fs, path = fsspec.core.url_to_fs(url)
    return _entry(url, fs.info(path))


def _entry(url: str, info: dict) -> dict:
    """Size plus the store's change marker: the ETag on object stores, else the modification time."""
    entry = {"url": url, "size": info.get("size")}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        entry["etag"] = str(etag).strip('"')
        return entry
    mtime = info.get("mtime", info.get("LastModified", info.get("created")))
    entry["mtime"] = mtime.timestamp() if isinstance(mtime, datetime) else mtime
    return entry


def canonical_json(obj) -> str:
    """One byte string per value: sorted keys, no whitespace, so equal dicts hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_id(encoder_fp: dict, dataset_fp: dict) -> str:
    """The cache's name in the store: 16 hex digits of sha256 over both fingerprints."""
    digest = hashlib.sha256(canonical_json({"encoder": encoder_fp, "dataset": dataset_fp}).encode())
    return digest.hexdigest()[:16]
