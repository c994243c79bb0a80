"""The precompute job: input shards -> decode + preprocess (CPU tasks) -> encoder actors -> committed shards.

Only input shards the cache has not committed are read, and each is committed once all of its
samples are accounted for (embedded or skipped), so a run killed at any point is finished by the
next one with the same result, and a run over a complete cache encodes nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from litpipe.config import DatasetConfig, EncoderConfig, PipelineConfig
from litpipe.ray_cluster import init_ray
from litpipe.store.cache import EmbeddingCache
from litpipe.models.image_encoder import Encoder, load_encoder
from litpipe.store.fingerprint import dataset_fingerprint
from litpipe.sources import SHARD_ERROR_KEY, Sample, list_shards, read_shard

from .decode import DecodeError, decode_and_preprocess


def precompute_dataset(cfg: PipelineConfig, name: str, encoder: Encoder, on_commit=None) -> dict:
    """Fill (or reuse) the cache of dataset `name`; `on_commit(record)` is called after each shard."""
    dataset = cfg.data[name]
    cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fingerprint(dataset),
                                          cfg.store.embedding_dtype, cfg.store.row_group_rows)
    inputs = list_shards(dataset)
    committed = cache.committed_inputs()  # one listing of commits/, not one per input
    todo = [url for url in inputs if url not in committed] if not cache.complete else []
    start = time.perf_counter()
    writer = ShardWriter(cache, on_commit)
    if todo:
        with tqdm(desc=f"precompute {name} -> {cache.id}", unit="img", dynamic_ncols=True, mininterval=1.0) as progress:
            for batch in embedding_stream(cfg, dataset, encoder, todo):
                writer.add(batch)
                progress.update(len(batch["input"]))
                progress.set_postfix(shards=f"{writer.shards}/{len(todo)}", skipped=sum(writer.skipped.values()))
    cache.finalize(expected_inputs=inputs)
    seconds = time.perf_counter() - start
    return {
        "dataset": name, "cache_id": cache.id, "cache_url": cache.url, "reused": not todo,
        "inputs": len(inputs), "inputs_processed": len(todo), "embedded": writer.embedded,
        "skipped": sum(writer.skipped.values()), "skipped_by_reason": dict(writer.skipped),
        "rows_in_cache": cache.num_rows, "seconds": round(seconds, 2),
        "images_per_s": round((writer.embedded + sum(writer.skipped.values())) / seconds, 1) if todo else None,
    }


def embedding_stream(cfg: PipelineConfig, dataset: DatasetConfig, encoder: Encoder, inputs: list[str]):
    """Ray Data, one line per stage; yields numpy batches of embedded (or skipped) samples.

    Reading and decoding share one CPU task per input shard: as separate stages Ray either fuses
    the decode tasks into the encoder actor (serialising them) or, as an actor pool, starves the
    read tasks of CPUs on small machines.
    """
    ray = init_ray(cfg.ray)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, with images/s
    use_gpu = cfg.encoder.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
    pre = cfg.precompute
    decode_args = {"dataset": dataset, "preprocess": encoder.preprocess, "image_size": encoder.image_size,
                   "max_pixels": pre.max_image_pixels}
    stream = (
        ray.data.from_items([{"input": url} for url in inputs], override_num_blocks=len(inputs))
        .flat_map(decoded_records, fn_kwargs=decode_args, compute=ray.data.TaskPoolStrategy(size=pre.decode_workers))
        .map_batches(EncoderActor, fn_constructor_kwargs={"encoder_cfg": cfg.encoder,
                                                          "weights_sha256": encoder.fingerprint["weights_sha256"]},
                     batch_size=pre.batch_size, batch_format="numpy",
                     compute=ray.data.ActorPoolStrategy(size=pre.encoder_actors), num_gpus=1 if use_gpu else 0)
    )
    yield from stream.iter_batches(batch_size=None, batch_format="numpy")


def decoded_records(row: dict, dataset: DatasetConfig, preprocess, image_size, max_pixels: int):
    """One input shard -> one record per sample with its preprocessed pixels or its error reason.

    Each record carries the shard's record count, so the writer knows when the shard is complete.
    """
    samples = read_shard(dataset, row["input"])
    if not samples:
        samples = [Sample(SHARD_ERROR_KEY, error="empty shard: no samples")]
    blank = np.zeros((3, *image_size), dtype=np.float32)
    for pos, sample in enumerate(samples):
        pixels, error = blank, sample.error
        if error is None:
            try:
                pixels = decode_and_preprocess(sample.image, preprocess, max_pixels)
            except DecodeError as err:
                error = stable_reason(str(err))
        yield {"input": row["input"], "pos": pos, "count": len(samples), "key": sample.key,
               "captions": json.dumps(sample.captions), "has_label": sample.label is not None,
               "label": -1 if sample.label is None else int(sample.label),
               "metadata": "" if sample.metadata is None else json.dumps(sample.metadata, sort_keys=True, default=str),
               "error": error or "", "pixels": pixels}


def stable_reason(reason: str) -> str:
    """Drop object addresses from library messages, so reruns record identical reasons."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", reason)


class EncoderActor:
    """Holds the locked encoder on its device (a GPU when the actor has one) and embeds batches."""

    def __init__(self, encoder_cfg: EncoderConfig, weights_sha256: str):
        self.encoder = load_encoder(encoder_cfg)
        if self.encoder.fingerprint["weights_sha256"] != weights_sha256:
            raise RuntimeError("encoder actor loaded different weights than the driver fingerprinted "
                               f"({self.encoder.fingerprint['weights_sha256'][:12]} vs {weights_sha256[:12]}); "
                               "make encoder.pretrained resolve to the same file on every node")

    def __call__(self, batch: dict) -> dict:
        pixels = batch.pop("pixels")
        good = np.flatnonzero(batch["error"] == "")
        embedding = np.zeros((len(pixels), self.encoder.dim), dtype=np.float32)
        if len(good):
            embedding[good] = self.encoder.encode(pixels[good]).numpy()
        batch["embedding"] = embedding
        return batch


class ShardWriter:
    """Collects the samples of each input shard and commits the shard once every one has arrived."""

    def __init__(self, cache: EmbeddingCache, on_commit=None):
        self.cache, self.on_commit = cache, on_commit
        self.pending: dict[str, list[dict]] = defaultdict(list)
        self.embedded = self.shards = 0
        self.skipped: Counter = Counter()

    def add(self, batch: dict) -> None:
        columns = {k: v for k, v in batch.items() if k != "embedding"}
        for i in range(len(batch["input"])):
            row = {k: v[i] for k, v in columns.items()}
            row["embedding"] = batch["embedding"][i]
            rows = self.pending[row["input"]]
            rows.append(row)
            if len(rows) == int(row["count"]):
                self.commit(row["input"], self.pending.pop(row["input"]))

    def commit(self, input_url: str, rows: list[dict]) -> None:
        rows.sort(key=lambda r: int(r["pos"]))  # input order: identical output on every run
        good = [r for r in rows if not r["error"]]
        errors = [{"key": str(r["key"]), "input": input_url, "reason": str(r["error"])} for r in rows if r["error"]]
        record = self.cache.commit_shard(input_url, shard_table(good, self.cache.dim), errors)
        self.embedded += len(good)
        self.skipped.update(e["reason"].split(":")[0] for e in errors)
        self.shards += 1
        if self.on_commit is not None and record is not None:
            self.on_commit(record)


def shard_table(rows: list[dict], dim: int) -> pa.Table:
    """The store's shard schema; `label` only when the shard's samples have labels."""
    vectors = np.stack([r["embedding"] for r in rows]).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    columns = {
        "key": pa.array([str(r["key"]) for r in rows], pa.string()),
        "captions": pa.array([json.loads(r["captions"]) for r in rows], pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
    }
    if any(r["has_label"] for r in rows):
        columns["label"] = pa.array([int(r["label"]) if r["has_label"] else None for r in rows], pa.int64())
    columns["metadata"] = pa.array([str(r["metadata"]) or None for r in rows], pa.string())
    return pa.table(columns)
