"""What a cache was made from: the dataset's input files and the id that names a cache.

A cache is reused only when its identity matches exactly, so everything that changes the vectors
(encoder, preprocessing, stored dtype, input bytes, column choices) must be in it, and nothing that
only spells them: a local path appears as its bytes' digest (the encoder's `spec`) or as the absolute
URL a listing gives (the dataset's inputs), never as a config wrote it.
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
    `classnames` is left out: it is read by eval and does not change any cached vector;
    `captions_file` too: its canonical URL and change marker are among the inputs.
    """
    options = dataset_cfg.model_dump(exclude={"format", "urls", "classnames", "captions_file"})
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


def cache_id(encoder_fp: dict, dataset_fp: dict, embedding_dtype: str = "float16") -> str:
    """The cache's name in the store: 16 hex digits of sha256 over both fingerprints and the stored dtype."""
    identity = {"encoder": encoder_fp, "dataset": dataset_fp, "embedding_dtype": embedding_dtype}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:16]
