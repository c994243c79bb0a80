"""How close the cache's readers come to the physical limit: a raw read of the same shard bytes.

Writes N x D float16 embeddings into a cache the way precompute does (parts of --part-rows rows),
builds its token cache (CLIP tokenizer, 77 tokens), then times, side by side in one run (each best
of --repeats, page cache warm for all): a raw read of the shard files into memory, `load_all()`
(with and without keys/captions), a full epoch of the streaming reader (vectors only, with keys
and captions; vectors only with the page CRC checks off, their cost), and the trainer's two input paths: the reader serving token ids from the token
cache against a raw read of shard + token files, and tokenising every step (`pretokenize: false`,
on a tenth of the epoch). With --text-features D, head-only training's input path too: a text-feature
cache of D float16 values per caption (random, as a frozen text model's would be laid out) written
beside the cache, and the reader serving image vectors with text features against a raw read of
shard + feature files. GB/s are file bytes over seconds, so every ratio is a ratio of times.
Goals: load_all >= 0.8x raw, reader >= 0.5x, reader with token ids >= 0.8x.

    .venv/bin/python bench/store_read.py --rows 1000000 --dim 512 [--text-features 768]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from litpipe.store.commits import commit_part, finalize
import litpipe.store.parts as parts_module
from litpipe.models.tokenizer import clip_tokenizer
from litpipe.store import EmbeddingCache, StreamingReader, load_all
from litpipe.store.parts import open_part
from litpipe.store.caption_rows import file_name, pick_captions
from litpipe.store.text_features import TextFeatureCache
from litpipe.train_text.token_cache import ensure_token_cache


def write_cache(root: str, rows: int, dim: int, shards: int, part_rows: int) -> EmbeddingCache:
    dataset = {"format": "bench", "options": {}, "inputs": [{"url": f"bench-{i}", "size": 0, "mtime": 0} for i in range(shards)]}
    cache = EmbeddingCache.open_or_create(root, {"model": "bench", "dim": dim, "spec": {}}, dataset, embedding_dtype="float16",
                                          rows_per_commit=part_rows)
    rng = np.random.default_rng(0)
    for s, shard in enumerate(np.array_split(np.arange(rows), shards)):
        parts = range(0, len(shard), part_rows)
        for k, start in enumerate(parts):
            part = shard[start:start + part_rows]
            vectors = rng.standard_normal((len(part), dim), dtype=np.float32).astype(np.float16)
            commit_part(cache, f"bench-{s}", pa.table({
                "key": [f"{i:09d}" for i in part],
                "captions": [[f"a photo of thing number {i}", f"caption {i % 1000}"] for i in part],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            }), part=k, last=k == len(parts) - 1)
    finalize(cache)
    return cache


def write_text_features(cache: EmbeddingCache, dim: int) -> TextFeatureCache:
    """Random float16 features for every caption of every row, written as the text-feature job writes them."""
    features = TextFeatureCache(cache, {"model": "bench", "dtype": "float16", "dim": dim})
    rng = np.random.default_rng(1)
    for record in cache.parts():
        captions = open_part(cache, record).read(columns=["captions"]).column("captions")
        counts = np.maximum(pc.fill_null(pc.list_value_length(captions), 0).to_numpy(), 1)
        features.write(record, rng.standard_normal((int(counts.sum()), dim), dtype=np.float32), counts)
    features.finalize()
    return features


def raw_read(paths: list[str], total: int) -> None:
    """The limit: the files' bytes into one preallocated buffer, no decoding."""
    buffer = memoryview(bytearray(total))
    offset = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buffer[offset:])) > 0:
                offset += n


def stream(cache: EmbeddingCache, batch_size: int, text: bool, per_caption=None) -> None:
    for _ in StreamingReader(cache, batch_size, seed=0, epoch=0, text=text, per_caption=per_caption):
        pass


def tokenise_each_step(cache: EmbeddingCache, batch_size: int, tokenizer, batches: int) -> None:
    """The trainer's input path with `pretokenize: false`: captions per step, tokenised there."""
    for k, batch in enumerate(StreamingReader(cache, batch_size, seed=0, epoch=0)):
        picks = pick_captions([len(c) for c in batch.captions], 0, k, 0)
        tokenizer([c[j] for c, j in zip(batch.captions, picks)])
        if k + 1 == batches:
            return


def unchecked(fn) -> None:
    """`fn` with the readers' page CRC checks off: what checking costs, side by side."""
    parts_module.CHECK_PAGE_CHECKSUMS = False
    try:
        fn()
    finally:
        parts_module.CHECK_PAGE_CHECKSUMS = True


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--part-rows", type=int, default=4096, help="rows per committed part (precompute.rows_per_commit)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-features", type=int, default=0, metavar="D",
                        help="also time head-only training's input path over D-wide text features (0: not)")
    parser.add_argument("--dir", default=None, help="where to write the cache, created if missing (default: a temp dir)")
    args = parser.parse_args()
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        start = time.perf_counter()
        cache = write_cache(root, args.rows, args.dim, args.shards, args.part_rows)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        tokenizer = clip_tokenizer(77)
        tokens = ensure_token_cache(cache, tokenizer)
        tokenise_s = time.perf_counter() - start
        paths = [cache.file_path(s) for s in cache.parts()]
        total = sum(s["bytes"] for s in cache.parts())
        token_paths = [f"{tokens.path}/{file_name(s)}" for s in cache.parts()]
        with_tokens = total + sum(os.path.getsize(p) for p in token_paths)
        raw_read(paths + token_paths, with_tokens)  # warm the page cache for everyone alike
        tenth = StreamingReader(cache, args.batch_size).num_batches // 10
        results = {
            "raw read": best_of(args.repeats, lambda: raw_read(paths, total)),
            "load_all(text=False)": best_of(args.repeats, lambda: load_all(cache, text=False)),
            "load_all()": best_of(args.repeats, lambda: load_all(cache)),
            "reader(text=False)": best_of(args.repeats, lambda: stream(cache, args.batch_size, text=False)),
            "reader()": best_of(args.repeats, lambda: stream(cache, args.batch_size, text=True)),
            "reader(text=False), CRCs unchecked": best_of(args.repeats, lambda: unchecked(
                lambda: stream(cache, args.batch_size, text=False))),
        }
        token_results = {
            "raw read + tokens": best_of(args.repeats, lambda: raw_read(paths + token_paths, with_tokens)),
            "reader(token ids)": best_of(args.repeats, lambda: stream(cache, args.batch_size, text=False, per_caption=tokens)),
            "tokenise each step": 10 * best_of(1, lambda: tokenise_each_step(cache, args.batch_size, tokenizer, tenth)),
        }
        feature_results = {}
        if args.text_features:
            features = write_text_features(cache, args.text_features)
            feature_paths = [f"{features.path}/{file_name(s)}" for s in cache.parts()]
            with_features = total + sum(os.path.getsize(p) for p in feature_paths)
            raw_read(paths + feature_paths, with_features)
            feature_results = {
                "raw read + features": best_of(args.repeats, lambda: raw_read(paths + feature_paths, with_features)),
                "reader(text features)": best_of(args.repeats, lambda: stream(cache, args.batch_size, text=False,
                                                                            per_caption=features)),
            }
    gb, gb_tokens = total / 1e9, with_tokens / 1e9
    print(f"{args.rows:,} x {args.dim} float16 in {len(paths)} files ({args.shards} shards), {gb:.2f} GB, token files "
          f"{gb_tokens - gb:.2f} GB; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; written in "
          f"{write_s:.1f} s, tokenised in {tokenise_s:.1f} s")
    for name, seconds in results.items():
        print(f"{name:34} {gb / seconds:6.2f} GB/s  {seconds:7.3f} s  {results['raw read'] / seconds:5.2f}x raw")
    for name, seconds in token_results.items():
        print(f"{name:34} {gb_tokens / seconds:6.2f} GB/s  {seconds:7.3f} s  "
              f"{token_results['raw read + tokens'] / seconds:5.2f}x raw (shard + token files)")
    for name, seconds in feature_results.items():
        print(f"{name:34} {with_features / 1e9 / seconds:6.2f} GB/s  {seconds:7.3f} s  "
              f"{feature_results['raw read + features'] / seconds:5.2f}x raw (shard + feature files), "
              f"{args.rows / seconds / 1e6:.2f} M rows/s")


if __name__ == "__main__":
    main()
