"""What a store holds: cache by cache (`litpipe cache ls`) and encoder by encoder (`litpipe cache du`).

Figures come from the manifests and commit records alone, no shard is opened. An input shard is
"shared" when another cache made by the same encoder fingerprint has embedded the same bytes
(same URL, size and change marker) with the same dataset options: vectors encoded twice, which
per-shard reuse across caches would encode once.
"""

from __future__ import annotations

import json
from collections import defaultdict

from litpipe.store.cache import EmbeddingCache
from litpipe.store.fingerprint import canonical_json


def describe(caches: list[EmbeddingCache]) -> list[dict]:
    """One plain dict per cache (what `cache ls --json` prints), oldest first as given."""
    inputs = {c.id: _input_ids(c) for c in caches}
    users = defaultdict(set)  # (encoder, input) -> caches holding it
    for c in caches:
        for item in inputs[c.id]:
            users[(_encoder_id(c), item)].add(c.id)
    out = []
    for c in caches:
        shards = c.shards()
        errors = c.manifest["num_errors"] if c.complete else sum(len(r["errors"]) for r in shards)
        fp = c.manifest["encoder"]
        out.append({
            "id": c.id, "url": c.url, "state": "complete" if c.complete else "partial", "created": c.manifest["created"],
            "encoder": {"model": fp.get("model"), "pretrained": fp.get("pretrained"),
                        "weights_sha256": (fp.get("weights_sha256") or "")[:12], "output": fp.get("output"),
                        "dim": fp.get("dim")},
            "dataset": c.manifest.get("dataset_name"), "format": c.manifest["dataset"].get("format"),
            "first_input": next((i["url"] for i in c.manifest["dataset"].get("inputs", [])), None),
            "inputs": len(inputs[c.id]), "rows": sum(r["rows"] for r in shards),
            "bytes": sum(r["bytes"] for r in shards), "errors": errors,
            "inputs_shared": sum(len(users[(_encoder_id(c), item)]) > 1 for item in inputs[c.id]),
        })
    return out


def disk_usage(described: list[dict], caches: list[EmbeddingCache]) -> list[dict]:
    """Per encoder fingerprint: its caches, rows and bytes, and what removing each cache frees (its own
    files: caches share no files today, so all of its bytes)."""
    groups: dict[str, dict] = {}
    for entry, cache in zip(described, caches):
        group = groups.setdefault(_encoder_id(cache), {"encoder": entry["encoder"], "caches": 0, "rows": 0, "bytes": 0,
                                                       "rm_frees": {}})
        group["caches"] += 1
        group["rows"] += entry["rows"]
        group["bytes"] += entry["bytes"]
        group["rm_frees"][entry["id"]] = entry["bytes"]
    return sorted(groups.values(), key=lambda g: -g["bytes"])


def _encoder_id(cache: EmbeddingCache) -> str:
    return canonical_json(cache.manifest["encoder"])


def _input_ids(cache: EmbeddingCache) -> list[str]:
    """Each input shard's identity with the options that decide its rows."""
    dataset = cache.manifest["dataset"]
    options = json.dumps([dataset.get("format"), dataset.get("options")], sort_keys=True, default=str)
    return [options + canonical_json(entry) for entry in dataset.get("inputs", [])]
