"""Caches as views over embedded shards: reuse across datasets, removal by reference.

A cache is named by its encoder and its whole dataset, but what an input shard's vectors depend on
is narrower: the encoder fingerprint, how the store keeps them (dtype, row groups, parts), the
dataset's format and options, and that one input's own bytes (URL, size, etag or mtime). Two
caches that agree on all of it for an input hold the same vectors, so precompute embeds only the
inputs no cache under store.root holds; the others are adopted, by batch commit records that name
the donor's data files (`commits.adopt`). Dataset v2 = v1 + k shards encodes k shards.

Files live in the folder of the cache that wrote them, and several caches may name them, so
removal goes by reference: `remove_cache` deletes a cache's manifest first (it stops being a
cache), then its records, then only the data files no remaining cache names. A removal cut
short leaves a folder without a manifest whose files `collect_garbage` deletes unless a cache
still names them. Folder datasets are never shared (their inputs are image files, not shards).
"""

from __future__ import annotations

import fsspec

from litpipe.store.commits import adopt, uncommit
from litpipe.files import to_url
from litpipe.store.cache import MANIFEST, EmbeddingCache, _join, list_caches, referenced_files
from litpipe.store.fingerprint import canonical_json


def shard_identities(cache: EmbeddingCache) -> dict[str, str]:
    """{input URL: everything the vectors of that input shard of `cache` depend on}; empty for
    datasets whose inputs are not shards (folders). `part_bytes` is not in it: it moves part ends
    only in shards of large images, an adopted shard is whole and never cut again, and caches made
    before it existed stay adoptable (docs/cache-format.md)."""
    m, dataset = cache.manifest, cache.manifest["dataset"]
    if dataset.get("format") == "folder":
        return {}
    common = [m["encoder"], m["embedding_dtype"], m["row_group_rows"], m.get("rows_per_commit"),
              dataset.get("format"), dataset.get("options")]
    return {entry["url"]: canonical_json([*common, entry]) for entry in dataset.get("inputs", [])}


def adopt_from_other_caches(cache: EmbeddingCache, inputs: list[str]) -> dict[str, str]:
    """Commit here every part of each of `inputs` (none of whose parts this cache holds) that another
    cache under the same root holds whole, with the same shard identity; {input URL: donor cache id}."""
    held, identities = cache.committed_parts(), shard_identities(cache)
    wanted = {identities[url]: url for url in inputs if url not in held and url in identities}
    adopted: dict[str, str] = {}
    jobs = []  # (record, donor, its skipped samples), committed together below
    for donor in list_caches(to_url(cache.fs, cache.root)) if wanted else []:
        if donor.id == cache.id or canonical_json(donor.manifest["encoder"]) != canonical_json(cache.manifest["encoder"]):
            continue
        whole = donor.committed_inputs()
        by_input: dict[str, list[dict]] = {}
        for record in donor.parts():
            if record["input"] in whole:
                by_input.setdefault(record["input"], []).append(record)
        skipped = errors_by_input(donor) if donor.complete and by_input else {}
        donor_identities = shard_identities(donor)
        for donor_input, records in by_input.items():
            if any(r.get("duplicates_dropped") for r in records):
                continue  # its rows depend on the donor's other shards (`duplicates.py`): not this input's alone
            url = wanted.pop(donor_identities.get(donor_input), None)
            if url is not None:
                jobs += [(record, donor, part_errors(record, skipped)) for record in records]
                adopted[url] = donor.id
        if not wanted:
            break
    adopt(cache, jobs)
    return adopted


def errors_by_input(cache: EmbeddingCache) -> dict[str, list[dict]]:
    by_input: dict[str, list[dict]] = {}
    for error in cache.errors():
        by_input.setdefault(error["input"], []).append(error)
    return by_input


def part_errors(record: dict, skipped: dict[str, list[dict]]) -> list[dict]:
    """A part's skipped samples: in its commit record, or (a finalized donor keeps them per input in
    errors.jsonl) all of the input's with its last part, so the input's set is whole."""
    if "errors" in record:
        return record["errors"]
    return skipped.get(record["input"], []) if record["last"] else []


def remove_cache(cache: EmbeddingCache, dry_run: bool = False) -> dict[str, list[str]]:
    """Delete `cache` and the data files no other cache names; {"deleted": [...], "kept": [...]} file URLs
    (kept: another cache names them too). `dry_run`: only say what would go."""
    fs = cache.fs
    still_named = _named_by_others(cache)
    files = {(cache.owner(r), r["path"]): cache.file_path(r) for r in cache.parts()}
    shard_dir = _join(cache.path, "shards")
    fs.invalidate_cache(shard_dir)
    own = fs.find(shard_dir) if fs.exists(shard_dir) else []
    files.update({(cache.id, f"shards/{path.rsplit('/', 1)[-1]}"): path for path in own})  # orphans too
    kept = {path for key, path in files.items() if key in still_named}
    plan = {"deleted": sorted(to_url(fs, p) for p in files.values() if p not in kept),
            "kept": sorted(to_url(fs, p) for p in kept)}
    if dry_run:
        return plan
    fs.rm_file(_join(cache.path, MANIFEST))  # first: from here on it is no cache, for finders and listings
    for path in files.values():
        if path not in kept:
            fs.rm_file(path)
    if any(path.startswith(cache.path.rstrip("/") + "/") for path in kept):
        for path in fs.find(cache.path):  # records, errors, token caches; the files others name stay
            if path not in kept:
                fs.rm_file(path)
    else:
        fs.rm(cache.path, recursive=True)
    fs.invalidate_cache(cache.path)
    return plan


def remove_part(cache: EmbeddingCache, name: str) -> dict:
    """Take part `name` out of `cache` (`commits.uncommit`) and delete its data file unless
    another cache names it; {"record", "deleted": the file's URL or None, "named_by": those caches' ids}.
    A damaged file is damaged for every cache that names it: each of them needs the same."""
    record = uncommit(cache, name)
    named_by = sorted(_named_by_others(cache).get((cache.owner(record), record["path"]), set()))
    deleted = None
    if not named_by:
        cache.fs.rm_file(cache.file_path(record))
        deleted = cache.file_url(record)
    return {"record": record, "deleted": deleted, "named_by": named_by}


def _named_by_others(cache: EmbeddingCache) -> dict[tuple[str, str], set[str]]:
    """`referenced_files` of every other cache under `cache`'s root."""
    return referenced_files([c for c in list_caches(to_url(cache.fs, cache.root)) if c.id != cache.id])


def collect_garbage(root: str, dry_run: bool = False) -> list[str]:
    """Delete the files of folders under `root` that hold no cache (a removal cut short) and that no
    cache names; their URLs (those it would delete, with `dry_run`)."""
    caches = list_caches(root)
    named, live = referenced_files(caches), {c.id for c in caches}
    fs, path = fsspec.core.url_to_fs(root)
    fs.invalidate_cache(path)
    garbage = []
    for folder in fs.ls(path, detail=False) if fs.exists(path) else []:
        folder = folder.rstrip("/")
        cache_id = folder.rsplit("/", 1)[-1]
        if cache_id in live or not fs.isdir(folder):
            continue
        garbage += [f for f in fs.find(folder) if (cache_id, f[len(folder) + 1:]) not in named]
    if not dry_run:
        for file in garbage:
            fs.rm_file(file)
    return sorted(to_url(fs, f) for f in garbage)
