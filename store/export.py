"""A cache in the layouts other tools read, written shard by shard in bounded memory.

The cache stores vectors as one `fixed_size_binary` per row (Parquet decodes it at memcpy speed;
docs/cache-format.md), which other tools read as opaque bytes. An export rewrites them:

- `npy`: what clip-retrieval's `inference` writes, which autofaiss, embedding-reader and clip-retrieval's
  back end read:
      OUT/img_emb/img_emb_{i}.npy            [n_i, D] L2-normalised float16 (an inner-product index then
                                             ranks by cosine, as clip-retrieval's indices do)
      OUT/metadata/metadata_{i}.parquet      image_path, caption (the first), url, key, captions, label?,
                                             metadata; row-aligned with img_emb_{i}
  `{i}` is zero-padded to the digits of the file count, as clip-retrieval pads it, so the text order of the
  names readers sort is the row order. `image_path` is the image's path in a folder dataset and the
  sample's key elsewhere (as clip-retrieval names webdataset samples); `url` is the one img2dataset's
  metadata records (null where the input has none). `raw=True` keeps the vectors as the cache holds them.
- `arrow`: Parquet whose `embedding` column is `fixed_size_list<float32, D>`, what LanceDB and
  Hugging Face datasets treat as a vector:
      OUT/data/part-{i:05d}.parquet          key, caption, captions, label?, metadata, embedding

One output file (pair) per cache shard file with rows, in the cache's shard order, written row group by
row group: memory holds one row group, whatever the cache's size. OUT/export.json records the
cache, the encoder and the row counts, and is written last: a folder without it is unfinished.
"""

from __future__ import annotations

import json
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from litpipe.progress import progress

from litpipe.store.parts import open_part, read_part
from litpipe.files import write_atomic
from litpipe.store.cache import CacheError, EmbeddingCache, decode_embeddings

FORMATS = ("npy", "arrow")


def export_cache(cache: EmbeddingCache, out: str, fmt: Literal["npy", "arrow"],
                 dtype: Literal["float16", "float32"] | None = None, raw: bool = False) -> dict:
    """Write `cache` under `out` (any fsspec URL) as `fmt`; returns what export.json records.

    npy: normalised float16 by default (clip-retrieval's), `dtype` to choose; `raw` keeps the cache's vectors
    (in its stored dtype by default). arrow: the cache's vectors as float32, as vector tools expect.
    """
    if fmt not in FORMATS:
        raise CacheError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if not cache.complete:
        raise CacheError(f"cache {cache.id} is partial; finish it with `litpipe precompute` before exporting")
    normalise = fmt == "npy" and not raw
    dtype = "float32" if fmt == "arrow" else dtype or ("float16" if normalise else cache.embedding_dtype)
    fs, root = fsspec.core.url_to_fs(out)
    records = cache.parts()
    with_labels = any("label" in r["columns"] for r in records)
    if fmt == "npy":  # clip-retrieval writes no file for no rows (embedding-reader misaligns an empty .npy's metadata)
        records = [r for r in records if r["rows"]]
    files = []
    digits = len(str(max(len(records), 1)))  # clip-retrieval's int(log10(count)) + 1
    with progress(total=sum(r["rows"] for r in records), unit="row", unit_scale=True, desc=f"export {cache.id}") as bar:
        for i, record in enumerate(records):
            parquet = open_part(cache, record)
            groups = (_rows(cache, parquet, record, g, with_labels, dtype, normalise, fmt)
                      for g in range(parquet.num_row_groups))
            if fmt == "npy":
                files.append(_write_npy(fs, root, str(i).zfill(digits), record["rows"], cache.dim, dtype, groups, bar))
            else:
                written = _write_arrow(fs, f"{root}/data/part-{i:05d}.parquet", cache.dim, groups, bar)
                files += [written] if written else []
    summary = {"format": fmt, "dtype": dtype, "normalised": normalise, "cache_id": cache.id, "cache_url": cache.url,
               "dim": cache.dim, "rows": sum(r["rows"] for r in records), "files": files, "encoder": cache.manifest["encoder"]}
    write_atomic(fs, f"{root}/export.json", json.dumps(summary, indent=2, default=str).encode())
    return summary


def _rows(cache: EmbeddingCache, parquet: pq.ParquetFile, record: dict, group: int, with_labels: bool,
          dtype: str, normalise: bool, fmt: str) -> tuple[np.ndarray, pa.Table]:
    """One row group: its vectors as [n, D] `dtype`, and its text columns in the export's schema."""
    present = [c for c in ("key", "captions", "label", "metadata", "embedding") if c in record["columns"]]
    table = read_part(cache, parquet, record, present, group)
    vectors = decode_embeddings(table.column("embedding"), cache.dim, cache.embedding_dtype)
    if normalise:  # in float32, before the cast; a zero vector stays zero (clip-retrieval's `normalized`)
        vectors = vectors.astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1, norms)
    vectors = vectors.astype(dtype, copy=False)
    captions = table.column("captions")
    first = [texts[0] if texts else None for texts in captions.to_pylist()]
    metadata = table.column("metadata") if "metadata" in present else pa.nulls(table.num_rows, pa.string())
    keys = table.column("key")
    columns = {"key": keys, "caption": pa.array(first, pa.string())}
    if fmt == "npy":  # the columns clip-retrieval's back end shows
        fields = [json.loads(m) if m else {} for m in metadata.to_pylist()]
        paths = [f.get("path") if isinstance(f.get("path"), str) else key for f, key in zip(fields, keys.to_pylist())]
        urls = [f.get("url") if isinstance(f.get("url"), str) else None for f in fields]
        columns = {"image_path": pa.array(paths, pa.string()), **columns, "url": pa.array(urls, pa.string())}
    columns["captions"] = captions
    if with_labels:  # a shard without labels reads -1, as the cache's own reader gives them
        labels = table.column("label") if "label" in present else pa.nulls(table.num_rows, pa.int64())
        columns["label"] = pc.fill_null(labels, -1)
    columns["metadata"] = metadata
    return vectors, pa.table(columns)


def _write_npy(fs, root: str, i: str, rows: int, dim: int, dtype: str, groups, bar) -> dict:
    """img_emb_{i}.npy streamed after its header (the row count is known from the commit record), and
    metadata_{i}.parquet beside it, one row group per row group."""
    emb, meta = f"{root}/img_emb/img_emb_{i}.npy", f"{root}/metadata/metadata_{i}.parquet"
    fs.makedirs(f"{root}/img_emb", exist_ok=True)
    fs.makedirs(f"{root}/metadata", exist_ok=True)
    writer = None
    with fs.open(emb, "wb") as vectors_file, fs.open(meta, "wb") as meta_file:
        np.lib.format.write_array_header_1_0(vectors_file, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                            "shape": (rows, dim)})
        for vectors, table in groups:
            if not table.num_rows:
                continue
            vectors_file.write(np.ascontiguousarray(vectors).tobytes())
            writer = writer or pq.ParquetWriter(meta_file, table.schema)
            writer.write_table(table)
            bar.update(len(vectors))
        writer.close()
    return {"embeddings": emb, "metadata": meta, "rows": rows}


def _write_arrow(fs, path: str, dim: int, groups, bar) -> dict | None:
    """part-{i}.parquet, one row group per row group; none for a shard without rows."""
    rows, writer, f = 0, None, None
    try:
        for vectors, table in groups:
            if not table.num_rows:  # an empty row group trips readers (Hugging Face datasets)
                continue
            flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
            table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, dim))
            if writer is None:
                fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                f = fs.open(path, "wb")
                writer = pq.ParquetWriter(f, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            bar.update(table.num_rows)
    finally:
        if writer is not None:
            writer.close()
            f.close()
    return {"path": path, "rows": rows} if writer is not None else None
