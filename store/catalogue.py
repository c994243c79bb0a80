"""What a store holds: cache by cache (`litpipe cache ls`) and encoder by encoder (`litpipe cache du`).

Rows come from the manifests and commit records; bytes from one listing of each cache's folder, which
holds its own data files, records, token and text-feature rows (`disk_bytes`): summed over caches they
are the store's bytes on disk, each file once. A cache's part is "shared" when another cache's record
names the same data file (one adopted it: same encoder, same input bytes), and removing a cache frees
only the files of its folder that no other cache names.
"""

from __future__ import annotations

from litpipe.store.cache import EmbeddingCache, referenced_files
from litpipe.store.fingerprint import canonical_json


def describe(caches: list[EmbeddingCache]) -> list[dict]:
    """One plain dict per cache (what `cache ls --json` prints), in the order given."""
    named = referenced_files(caches)
    out = []
    for c in caches:
        shards = c.parts()
        shared = [r for r in shards if len(named[(c.owner(r), r["path"])]) > 1]
        kept_by_others = sum(r["bytes"] for r in shared if c.owner(r) == c.id)  # files of its folder others name
        fp = c.manifest["encoder"]
        out.append({
            "id": c.id, "url": c.url, "state": "complete" if c.complete else "partial", "created": c.manifest["created"],
            "encoder": {"model": fp.get("model"), "pretrained": fp.get("pretrained"),
                        "weights_sha256": (fp.get("weights_sha256") or "")[:12], "output": fp.get("output"),
                        "dim": fp.get("dim")},
            "dataset": c.manifest.get("dataset_name"), "format": c.manifest["dataset"].get("format"),
            "inputs": len(c.manifest["dataset"].get("inputs", [])),
            "first_input": next((i["url"] for i in c.manifest["dataset"].get("inputs", [])), None),
            "rows": sum(r["rows"] for r in shards), "bytes": sum(r["bytes"] for r in shards),
            "errors": c.manifest["num_errors"] if c.complete else sum(len(r["errors"]) for r in shards),
            "parts": len(shards), "parts_shared": len(shared), "bytes_shared": sum(r["bytes"] for r in shared),
            "disk_bytes": (disk := _folder_bytes(c)), "rm_frees": disk - kept_by_others,
        })
    return out


def disk_usage(described: list[dict], caches: list[EmbeddingCache]) -> list[dict]:
    """Per encoder fingerprint: its caches, the rows and bytes on disk (a shared file once), and what
    removing each cache frees (the files no other cache names)."""
    groups: dict[str, dict] = {}
    for entry, cache in zip(described, caches):
        group = groups.setdefault(canonical_json(cache.manifest["encoder"]),
                                  {"encoder": entry["encoder"], "caches": 0, "rows": {}, "bytes": 0, "rm_frees": {}})
        group["caches"] += 1
        for record in cache.parts():
            group["rows"][(cache.owner(record), record["path"])] = record["rows"]
        group["bytes"] += entry["disk_bytes"]
        group["rm_frees"][entry["id"]] = entry["rm_frees"]
    return sorted(({"encoder": g["encoder"], "caches": g["caches"], "rows": sum(g["rows"].values()), "bytes": g["bytes"],
                    "rm_frees": g["rm_frees"]} for g in groups.values()), key=lambda g: -g["bytes"])


def _folder_bytes(cache: EmbeddingCache) -> int:
    """Every byte under the cache's folder: data files, records, manifest, token and text-feature rows."""
    cache.fs.invalidate_cache(cache.path)
    return int(cache.fs.du(cache.path, total=True))
