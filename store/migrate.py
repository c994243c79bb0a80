"""Caches made before identity by content (format version 2), found again without encoding.

A version 2 cache's id covered local paths as the config spelled them (`encoder.pretrained`, an hf
model folder, `captions_file`) and not the stored dtype, so the same weights named from another
folder made another cache. Its vectors are still right: when its encoder agrees with today's on
everything but those spellings (the weights by `weights_sha256`, the tensors' bytes) and its inputs
are today's, `adopt_legacy` makes today's cache from it by adopting every part (records that name
its data files: nothing is copied or encoded), carries its token and text-feature rows over,
finalizes, and removes the old cache by reference (its data files stay, named by the new one).
`litpipe precompute` does this before it plans any encoding.
"""

from __future__ import annotations

from litpipe.store.commits import adopt, finalize
from litpipe.store.cache import FORMAT_VERSION, EmbeddingCache, list_caches
from litpipe.store.fingerprint import canonical_json
from litpipe.store.sharing import errors_by_input, part_errors, remove_cache

SPELLED = ("source", "model", "pretrained", "spec")  # encoder fields a version 2 cache spelled or shaped otherwise
BESIDE = ("tokens", "text_features")  # per-caption rows kept in a cache's folder (store/caption_rows.py)


def same_vectors(encoder_fp: dict, dataset_fp: dict, embedding_dtype: str) -> str:
    """What a version 2 and a version 3 cache of the same vectors agree on: the fingerprints less
    the fields that spelled paths (or that version 2 left out), and the stored dtype."""
    encoder = {k: v for k, v in encoder_fp.items() if k not in SPELLED}
    encoder["preprocess"] = {k: v for k, v in encoder_fp.get("preprocess", {}).items() if k != "resize_to"}
    settings = {k: v for k, v in encoder_fp.get("spec", {}).items() if k not in ("source", "model", "pretrained")}
    options = {k: v for k, v in dataset_fp.get("options", {}).items() if k != "captions_file"}
    return canonical_json([encoder, settings, {**dataset_fp, "options": options}, embedding_dtype])


def adopt_legacy(root: str, encoder_fp: dict, dataset_fp: dict, embedding_dtype: str,
                 dataset_name: str | None = None) -> str | None:
    """Make today's cache of these fingerprints from a complete version 2 cache of the same vectors
    (the newest); that cache's id, or None when there is none or today's cache exists already."""
    if EmbeddingCache.find(root, encoder_fp, dataset_fp, embedding_dtype) is not None:
        return None
    wanted = same_vectors(encoder_fp, dataset_fp, embedding_dtype)
    legacy = [c for c in list_caches(root) if c.manifest["format_version"] < FORMAT_VERSION and c.complete
              and same_vectors(c.manifest["encoder"], c.manifest["dataset"], c.embedding_dtype) == wanted]
    if not legacy:
        return None
    donor = legacy[-1]
    cache = EmbeddingCache.open_or_create(root, encoder_fp, dataset_fp, embedding_dtype, donor.manifest["row_group_rows"],
                                          donor.rows_per_commit, dataset_name=dataset_name or donor.manifest.get("dataset_name"),
                                          part_bytes=donor.part_bytes)
    skipped = errors_by_input(donor)
    adopt(cache, [(record, donor, part_errors(record, skipped)) for record in donor.parts()])
    for folder in BESIDE:
        if donor.fs.exists(f"{donor.path}/{folder}"):
            donor.fs.mv(f"{donor.path}/{folder}", f"{cache.path}/{folder}", recursive=True)
    finalize(cache, expected_inputs=donor.committed_inputs())
    remove_cache(donor)
    return donor.id
