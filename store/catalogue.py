"""What a store holds: cache by cache (`litpipe cache ls`) and encoder by encoder (`litpipe cache du`).

Figures come from the manifests and commit records alone; no shard is opened. A cache's part is
"shared" when another cache's record names the same data file (one adopted it: same encoder, same
input bytes), and removing a cache frees only the files no other cache names.
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
        })
    return out


def disk_usage(described: list[dict], caches: list[EmbeddingCache]) -> list[dict]:
    """Per encoder fingerprint: its caches, the rows and bytes on disk (a shared file once), and what
    removing each cache frees (the files no other cache names)."""
    groups: dict[str, dict] = {}
    for entry, cache in zip(described, caches):
        group = groups.setdefault(canonical_json(cache.manifest["encoder"]),
                                  {"encoder": entry["encoder"], "caches": 0, "files": {}, "rm_frees": {}})
        group["caches"] += 1
        for record in cache.parts():
            group["files"][(cache.owner(record), record["path"])] = (record["rows"], record["bytes"])
        group["rm_frees"][entry["id"]] = entry["bytes"] - entry["bytes_shared"]
    return sorted(({"encoder": g["encoder"], "caches": g["caches"], "rows": sum(r for r, _ in g["files"].values()),
                    "bytes": sum(b for _, b in g["files"].values()), "rm_frees": g["rm_frees"]}
                   for g in groups.values()), key=lambda g: -g["bytes"])
