"""The precompute job: input shards -> read + decode (CPU tasks) -> encode + write + commit (encoder actors).

It reads like Ray Data's batch-inference examples to the end: the write happens where the vectors
are made. A read task (`read.py`) cuts its input shard into parts of `rows_per_commit` samples
(fewer where their images pass `part_bytes`) and decodes each to uint8 pixels; an encoder actor finishes the pixels on its device, embeds them, writes the
part's Parquet file and commits it (the store's exclusive commit). The driver schedules and counts
what comes back: one small summary per committed part, never a vector. All datasets of a run go
through one job, so the actors load the encoder once and never wait for a dataset's tail.

Only parts the cache has not committed are decoded, and parts are cut the same way on every run
(the cache fixes `rows_per_commit` and `part_bytes`), so a run killed at any point is finished by the next one with
the same result, and a run over a complete cache encodes nothing. A shard that cannot be read
after the retries (network, store) fails without a commit and is reported: never a skip.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from ray.util.annotations import RayDeprecationWarning
from litpipe.progress import progress

from litpipe.store.commits import commit_part, finalize
from litpipe.config import DatasetConfig, EncoderConfig, PipelineConfig
from litpipe.devices import keep_freed_memory_env
from litpipe.errors import UserError
from litpipe.models.image_encoder import EncoderDescription, load_encoder
from litpipe.ray_cluster import init_ray
from litpipe.skips import DUPLICATE_KEY, reason_kind
from litpipe.sources import list_shards
from litpipe.store.cache import EmbeddingCache
from litpipe.store.fingerprint import dataset_fingerprint
from litpipe.store.migrate import adopt_legacy
from litpipe.store.sharing import adopt_from_other_caches, shard_identities

from .decode import Part
from .device_decode import finish_decoding
from .read import load_part, read_parts
from .results import DatasetResult, PrecomputeSummary


def precompute(cfg: PipelineConfig, names: list[str], encoder: EncoderDescription, on_commit=None) -> PrecomputeSummary:
    """Fill (or reuse) the caches of datasets `names`; `on_commit(summary)` is called after each part.

    The datasets share one Ray Data job, so the encoder actors start once and go from one
    dataset's parts to the next without draining. A dataset with input shards an earlier one is
    still encoding waits for a later job, so it adopts those shards instead of encoding them twice.
    """
    start, results, processed, encoded_any = time.perf_counter(), {}, 0, False
    for plans in waves(cfg, names, encoder):
        encoding = [p for p in plans if p.to_encode]
        if encoding:
            encoded_any = True
            with progress(desc="precompute " + ", ".join(f"{p.name} -> {p.cache.id}" for p in encoding), unit="img",
                          dynamic_ncols=True, mininterval=1.0) as bar:
                by_name = {p.name: p for p in encoding}
                for summary in part_summaries(cfg, encoding, encoder):
                    by_name[summary.dataset].count(summary)
                    bar.update(summary.rows + summary.num_skipped)
                    bar.set_postfix(parts=sum(p.parts for p in encoding),
                                         skipped=sum(sum(p.skipped.values()) for p in encoding))
                    if on_commit is not None and summary.committed:
                        on_commit(summary)
        for p in plans:
            results[p.name] = finish(p)
            processed += p.embedded + sum(p.skipped.values())
    seconds = time.perf_counter() - start
    return PrecomputeSummary({name: results[name] for name in names}, processed, round(seconds, 2),
                             round(processed / seconds, 1) if encoded_any else None)


@dataclass
class PartSummary:
    """What an encoder actor tells the driver of one part: where it is, whether it is committed (or why
    not), and its counts. The vectors stay in the store; only this crosses back to the driver."""

    dataset: str
    input: str
    part: int
    committed: bool
    failure: str  # why the part could not be written ("" when it was): it stays uncommitted, a rerun retries it
    actor: str  # host:pid of the encoder actor
    decoded_by: str  # host:pid of the read task's worker
    rows: int = 0  # embedded
    skipped: Counter = field(default_factory=Counter)  # by reason kind
    legacy_captions: int = 0  # captions read as cp1252/Latin-1

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class Plan:
    """One dataset's share of a job: its cache, the inputs adopted from other caches, the inputs
    still to encode with the parts of each committed already ({input: part numbers}), and the tally
    of what came back."""

    name: str
    dataset: DatasetConfig
    inputs: list[str]
    cache: EmbeddingCache
    adopted: dict[str, str]
    to_encode: dict[str, set[int]]
    embedded: int = 0
    legacy_captions: int = 0
    parts: int = 0
    skipped: Counter = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # input -> why a part of it could not be written
    actors: set[str] = field(default_factory=set)  # host:pid of each encoder actor that wrote a part
    readers: set[str] = field(default_factory=set)  # host:pid of each read task's worker that decoded one
    # input -> its parts whose rows this run counted: committed by it, or found committed by an attempt
    # of it whose answer was lost with its node (its rows are in the cache all the same)
    counted: dict[str, set[int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # driver's steps: plan, finalize

    def count(self, summary: PartSummary) -> None:
        if summary.failure:
            self.failures.setdefault(summary.input, summary.failure)
        self.embedded += summary.rows
        self.skipped.update(summary.skipped)
        self.legacy_captions += summary.legacy_captions
        self.parts += 1
        self.actors.add(summary.actor)
        self.readers.add(summary.decoded_by)
        if not summary.failure:
            self.counted.setdefault(summary.input, set()).add(summary.part)


def plan(cfg: PipelineConfig, name: str, encoder: EncoderDescription) -> Plan:
    """List the dataset's inputs, open (or create) its cache, adopt what other caches hold."""
    start = time.perf_counter()
    dataset = cfg.data[name]
    inputs = list_shards(dataset)  # checked before Ray started (`stage.run`: `check_inputs`)
    dataset_fp = dataset_fingerprint(dataset)
    legacy = adopt_legacy(cfg.store.root, encoder.fingerprint, dataset_fp, cfg.store.embedding_dtype, dataset_name=name)
    cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fp,
                                          cfg.store.embedding_dtype, cfg.store.row_group_rows, cfg.precompute.rows_per_commit,
                                          dataset_name=name, part_bytes=cfg.precompute.part_bytes)
    if legacy:
        adopted = {url: legacy for url in cache.committed_inputs()}
    else:
        adopted = {} if cache.complete else adopt_from_other_caches(cache, inputs)
    done = set(inputs) if cache.complete else cache.committed_inputs()  # one listing of commits/
    missing = [url for url in inputs if url not in done]
    parts = cache.committed_parts() if missing else {}
    return Plan(name, dataset, inputs, cache, adopted, {url: parts.get(url, set()) for url in missing},
                seconds={"plan": round(time.perf_counter() - start, 3)})


def waves(cfg: PipelineConfig, names: list[str], encoder: EncoderDescription):
    """The datasets' plans, cut into jobs whose datasets encode no input shard in common; each job's
    plans are made after the one before has run, so a shard it embedded is adopted, not encoded again."""
    pending = list(names)
    while pending:
        plans, later, encoding = [], [], set()
        for name in pending:
            p = plan(cfg, name, encoder)
            identities = shard_identities(p.cache)
            shared = {identities.get(url, url) for url in p.to_encode}
            if shared & encoding:
                later.append(name)
                continue
            encoding |= shared
            plans.append(p)
        yield plans
        pending = later


def finish(p: Plan) -> DatasetResult:
    """Finalize the dataset's cache if every input is committed; its result."""
    failed = sorted(set(p.to_encode) - p.cache.committed_inputs()) if p.to_encode else []
    if not failed and not p.cache.complete:
        start = time.perf_counter()
        finalize(p.cache, expected_inputs=p.inputs)
        p.seconds["finalize"] = round(time.perf_counter() - start, 3)
        # Keys repeated across input shards are resolved over every committed part: the copies this
        # run embedded and finalize dropped count as skipped, not embedded.
        dropped = sum(r.get("duplicates_dropped", 0) for r in p.cache.parts()
                      if r["part"] in p.counted.get(r["input"], ()))
        if dropped:
            p.embedded -= dropped
            p.skipped[DUPLICATE_KEY] += dropped
    return DatasetResult(
        dataset=p.name, cache_id=p.cache.id, cache_url=p.cache.url, reused=not p.to_encode, complete=p.cache.complete,
        inputs=len(p.inputs), inputs_processed=len(p.to_encode), failed_inputs=failed,
        failures={url: p.failures[url] for url in failed if url in p.failures}, embedded=p.embedded,
        skipped=sum(p.skipped.values()), skipped_by_reason=dict(p.skipped), inputs_reused=len(p.adopted),
        reused_from=sorted(set(p.adopted.values())), rows_in_cache=p.cache.num_rows, legacy_captions=p.legacy_captions,
        uncaptioned=p.cache.uncaptioned, encoded_by=sorted(p.actors), decoded_by=sorted(p.readers), seconds=p.seconds)


def part_summaries(cfg: PipelineConfig, plans: list[Plan], encoder: EncoderDescription):
    """Ray Data, one line per stage, over the parts of every plan; yields one summary per committed
    part (dicts of plain values, each naming its dataset).

    A read task that still fails after `precompute.read_retries` retries (its own, `read_parts`)
    errors its block; the job goes on with the other shards (`max_errored_blocks`) and the caller
    finds that shard uncommitted. Ray's task retries stay Ray Data's, for workers and nodes lost.
    """
    ray = init_ray(cfg.ray)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts images, with images/s
    context.max_errored_blocks = -1
    pre = cfg.precompute
    cpus = ray.cluster_resources().get("CPU", 0)
    if pre.encoder_actors >= cpus:  # each actor holds a CPU: read tasks would wait forever
        raise UserError(f"precompute.encoder_actors ({pre.encoder_actors}) takes every CPU of the Ray cluster "
                        f"({cpus:g}), leaving none for the read tasks; lower precompute.encoder_actors or give Ray "
                        "more CPUs (ray.num_cpus, or more nodes)")
    use_gpu = encoder_uses_gpu(cfg.encoder, ray)
    runtime_env = worker_runtime_env()
    inputs = [{"dataset": p.name, "input": url, "skip": sorted(skip)} for p in plans for url, skip in p.to_encode.items()]
    # Ray Data fuses a task map into the actor map after it when their remote args agree: the reads
    # would then decode inside the encoder actor, serially with its forward. The read op states Ray
    # Data's own default for its tasks (max_retries=-1: retried whenever a worker or node is lost),
    # which keeps it a pool of tasks of its own. Remote args have no named parameter for this yet.
    warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", RayDeprecationWarning)
    stream = (
        ray.data.from_items(inputs, override_num_blocks=len(inputs))
        .map_batches(read_parts, batch_size=1, batch_format="pyarrow",
                     fn_kwargs={"datasets": {p.name: p.dataset for p in plans},
                                "rows_per_commit": {p.name: p.cache.rows_per_commit for p in plans},
                                "part_bytes": {p.name: p.cache.part_bytes for p in plans},
                                "pixels": encoder.cpu_step, "max_pixels": pre.max_image_pixels,
                                "jpeg_on_device": jpeg_on_device(cfg.encoder, use_gpu), "yield_cpu": not use_gpu,
                                "read_retries": pre.read_retries},
                     compute=ray.data.TaskPoolStrategy(size=pre.decode_workers), runtime_env=runtime_env,
                     max_retries=-1)
        .map_batches(PartEncoder, batch_size=1, batch_format="pyarrow",
                     fn_constructor_kwargs={"encoder_cfg": cfg.encoder, "weights_sha256": encoder.fingerprint["weights_sha256"],
                                            "cache_urls": {p.name: p.cache.url for p in plans},
                                            "batch_size": pre.batch_size, "max_pixels": pre.max_image_pixels,
                                            "threads": pre.encoder_threads},
                     compute=ray.data.ActorPoolStrategy(size=pre.encoder_actors), num_gpus=1 if use_gpu else 0,
                     runtime_env=runtime_env)
    )
    for batch in stream.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):  # each as it lands
        yield from (pickle.loads(blob) for blob in batch.column("summary").to_pylist())


_DESCRIBED: dict[str, EncoderDescription] = {}  # this process's descriptions, by encoder section and checkpoint file


def describe_encoder(cfg: PipelineConfig) -> EncoderDescription:
    """The encoder's fingerprint and CPU pixel step, from a Ray worker that builds the tower once and
    exits: the driver never holds the model (a ViT-bigG is about 10 GB). The encoder actors build it
    again and check its weights against this fingerprint. Asked again in this process (the ablation
    runs three pipelines) for the same section and weights on disk, it answers from memory."""
    key = json.dumps([cfg.encoder.model_dump(mode="json"), _weights_on_disk(cfg.encoder)], sort_keys=True)
    if key not in _DESCRIBED:
        ray = init_ray(cfg.ray)
        remote = ray.remote(num_cpus=1, max_calls=1)(_describe)  # max_calls: the worker exits and frees the model
        _DESCRIBED[key] = ray.get(remote.options(runtime_env=worker_runtime_env()).remote(cfg.encoder))
    return _DESCRIBED[key]


def _weights_on_disk(encoder_cfg: EncoderConfig) -> list:
    """Size and mtime of the local files the weights come from (a checkpoint file; a Hugging Face model folder's
    files), so a checkpoint rewritten in place is described again."""
    path = encoder_cfg.model if encoder_cfg.source == "hf" else encoder_cfg.pretrained
    if not path or not os.path.exists(path):
        return []
    files = [path] if os.path.isfile(path) else sorted(str(f) for f in Path(path).rglob("*") if f.is_file())
    return [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def _describe(encoder_cfg: EncoderConfig) -> EncoderDescription:
    return load_encoder(encoder_cfg, device="cpu").describe()


def encoder_uses_gpu(encoder_cfg: EncoderConfig, ray) -> bool:
    return encoder_cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0


def worker_runtime_env() -> dict:
    """The read tasks' and encoder actors' runtime_env: glibc keeps the memory they free (with its
    defaults each CPU forward, and each part's copies of its pixels, get fresh pages)."""
    return {"env_vars": keep_freed_memory_env()}


def jpeg_on_device(encoder_cfg: EncoderConfig, use_gpu: bool) -> bool:
    """`encoder.jpeg_decode`: `auto` decodes JPEGs on the encoder's GPU when the tensor path resizes there."""
    if encoder_cfg.jpeg_decode == "auto":
        return use_gpu and encoder_cfg.preprocess == "tensor"
    return encoder_cfg.jpeg_decode == "device"


class PartEncoder:
    """Holds the locked encoder on its device (a GPU when the actor has one); embeds, writes and
    commits one part per call, and returns only its summary."""

    def __init__(self, encoder_cfg: EncoderConfig, weights_sha256: str, cache_urls: dict[str, str], batch_size: int,
                 max_pixels: int, threads: int | None):
        if threads or not torch.cuda.is_available():  # Ray sets OMP_NUM_THREADS to the actor's CPUs (1):
            torch.set_num_threads(threads or os.cpu_count())  # a CPU encoder wants its node's cores
        self.encoder = load_encoder(encoder_cfg)
        if self.encoder.fingerprint["weights_sha256"] != weights_sha256:
            raise RuntimeError("encoder actor loaded different weights than the fingerprint of this job "
                               f"({self.encoder.fingerprint['weights_sha256'][:12]} vs {weights_sha256[:12]}); "
                               "make encoder.pretrained resolve to the same file on every node")
        self.caches = {name: EmbeddingCache.open(url) for name, url in cache_urls.items()}  # by dataset
        self.batch_size, self.max_pixels = batch_size, max_pixels
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> dict:
        """Ray Data's call: the parts of `batch` committed, their summaries pickled (one column of bytes)."""
        return {"summary": [pickle.dumps(self.commit(name.as_py(), url.as_py(), part.as_py(), last.as_py(),
                                                     load_part(payload, buffers)))
                            for name, url, part, last, payload, buffers in zip(*(batch[c] for c in (
                                "dataset", "input", "part", "last", "payload", "buffers")))]}

    def commit(self, dataset: str, input_url: str, part: int, last: bool, decoded: Part) -> PartSummary:
        """Embed a part batch by batch (JPEGs still encoded are decoded per batch, bounding device
        memory), then write and commit it; its summary."""
        done = Part(errors=decoded.errors, legacy_captions=decoded.legacy_captions, decoded_by=decoded.decoded_by)
        vectors = []
        for start in range(0, len(decoded), self.batch_size):
            batch = finish_decoding(decoded.rows(start, start + self.batch_size), self.encoder.pixels.cpu_step,
                                    self.encoder.device, self.max_pixels)
            if batch.pixels:
                vectors.append(self.encoder.embed_pixels(batch.pixels))
            batch.pixels = []  # embedded: the part's record needs no pixels
            done.extend(batch)
        embeddings = torch.cat(vectors).numpy() if vectors else np.zeros((0, self.encoder.dim), np.float32)
        errors = [{**e, "input": input_url} for e in done.errors]
        failure = ""
        try:
            record = commit_part(self.caches[dataset], input_url, part_table(done, embeddings), errors, part=part, last=last)
        except OSError as err:  # the store's retries are spent, or its disk is full: this part stays uncommitted
            record, failure = None, f"{type(err).__name__}: {err}"
        return PartSummary(dataset, input_url, part, record is not None, failure, self.name, decoded.decoded_by,
                           rows=0 if failure else len(embeddings),
                           skipped=Counter() if failure else Counter(reason_kind(e["reason"]) for e in errors),
                           legacy_captions=0 if failure else done.legacy_captions)


def part_table(decoded: Part, embeddings: np.ndarray) -> pa.Table:
    """The store's shard schema; `label` only when the part's samples have labels."""
    columns = {
        "key": pa.array(decoded.keys, pa.string()),
        "captions": pa.array(decoded.captions, pa.list_(pa.string())),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).reshape(-1)), embeddings.shape[1]),
    }
    if any(label is not None for label in decoded.labels):
        columns["label"] = pa.array(decoded.labels, pa.int64())
    columns["metadata"] = pa.array(decoded.metadata, pa.string())
    return pa.table(columns)
