"""What a cache was made from: the dataset's input files and the id that names a cache.

A cache is reused only when both fingerprints match exactly, so everything that changes the
vectors (encoder, preprocessing, input bytes, column choices) must be in one of them.
"""

from __future__ import annotations

import hashlib
import json
import os

import fsspec

from litpipe.files import expand_urls, file_info, list_files, to_url


def dataset_fingerprint(dataset_cfg) -> dict:
    """{"format", "options", "inputs": [{"url", "size", "etag" or "mtime"}]} of a `data` entry.

    For `folder`, the inputs are the captions file and every file under the folder(s), hidden
    files excepted: adding, removing or rewriting an image changes the fingerprint.
    `classnames` is left out: it is read by eval and does not change any cached vector.
    """
    options = dataset_cfg.model_dump(exclude={"format", "urls", "classnames"})
    if dataset_cfg.format == "folder":
        inputs = [{"url": u, **info} for u, info in list_files(dataset_cfg.captions_file).items()] if dataset_cfg.captions_file else []
        for folder in expand_urls(dataset_cfg.urls):
            fs, path = fsspec.core.url_to_fs(folder)
            listing = fs.find(path, detail=True)
            for name in sorted(listing):
                if not os.path.basename(name).startswith("."):
                    inputs.append({"url": to_url(fs, name), **file_info(listing[name])})
    else:
        inputs = [{"url": url, **info} for url, info in list_files(dataset_cfg.urls).items()]
    return {"format": dataset_cfg.format, "options": options, "inputs": inputs}


def canonical_json(obj) -> str:
    """One byte string per value: sorted keys, no whitespace, so equal dicts hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def cache_id(encoder_fp: dict, dataset_fp: dict) -> str:
    """The cache's name in the store: 16 hex digits of sha256 over both fingerprints."""
    digest = hashlib.sha256(canonical_json({"encoder": encoder_fp, "dataset": dataset_fp}).encode())
    return digest.hexdigest()[:16]
