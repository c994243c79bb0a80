"""Input shards and the samples in each: WebDataset tars, Parquet files, a folder plus captions file.

One definition of what a dataset's shards, samples and keys are: precompute reads samples to embed
them, eval and serve read them back to show the image behind a cached key. Reading a shard never
raises for bad data: a bad sample comes back with an `error`, a truncated tar keeps every sample
before the cut plus one error for the cut, and bytes that are no shard at all are one error
sample, so the caller can account for every sample. A failure to *read* bytes (network, store,
disk) is another matter: it raises `TransientReadError`, to be retried, and is never recorded as
bad data.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.config import DatasetConfig
from litpipe.errors import UserError
from litpipe.files import expand_urls

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
PARQUET_IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "image_bytes")
PARQUET_CAPTION_COLUMNS = ("caption", "captions", "txt", "text", "sentences")
FOLDER_ROWS_MARK = "#rows="
SHARD_ERROR_KEY = ""  # an error that is about the whole input shard, not one sample
# What a parser raises for bytes that are all there but are no (or a cut) tar stream.
BAD_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class TransientReadError(Exception):
    """Bytes of an input could not be read (network, object store, disk): worth retrying, and never
    recorded as bad data. Not an OSError on purpose, so no parser above mistakes it for bad bytes."""


class _ReadFaults:
    """A file object whose own failures surface as TransientReadError; a parser reading through it
    then fails on its own only for the bytes it was given."""

    def __init__(self, file, url: str):
        self._file, self._url = file, url

    def read(self, *args):
        return _transient(self._url, self._file.read, *args)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def _transient(url: str, call, *args):
    try:
        return call(*args)
    except (TransientReadError, UserError):
        raise
    except Exception as err:
        raise TransientReadError(f"{url}: {type(err).__name__}: {err}") from err


def open_input(url: str, compression: str | None = None):
    """`url` opened for reading, read failures tagged transient; `compression="infer"` unwraps .gz etc."""
    raw = _ReadFaults(_transient(url, lambda: fsspec.open(url, "rb").open()), url)
    codec = fsspec.utils.infer_compression(url) if compression == "infer" else compression
    return fsspec.compression.compr[codec](raw, mode="rb") if codec else raw


@dataclass
class Sample:
    key: str
    image: bytes | None = None
    captions: list[str] = field(default_factory=list)
    label: int | None = None
    metadata: dict | None = None
    error: str | None = None


def list_shards(dataset: DatasetConfig) -> list[str]:
    """The dataset's input shard URLs, sorted; for `folder`, row ranges of the captions file."""
    if dataset.format != "folder":
        return expand_urls(dataset.urls)
    if not dataset.captions_file:
        raise UserError("data: a `folder` dataset needs captions_file (JSONL or CSV with path, caption(s), label)")
    captions_url = _one_path(dataset.captions_file, "captions_file")
    _one_path(dataset.urls, "urls")  # image paths are relative to one folder
    rows = len(_read_caption_rows(captions_url))
    step = dataset.shard_rows
    return [f"{captions_url}{FOLDER_ROWS_MARK}{start}-{min(start + step, rows)}" for start in range(0, rows, step)]


def read_shard(dataset: DatasetConfig, url: str) -> list[Sample]:
    """Every sample of one input shard, in input order; never raises for bad data.

    Raises TransientReadError when bytes could not be read, UserError for a configuration that
    does not fit the data (a column that is not there).
    """
    reader = {"webdataset": read_tar, "parquet": read_parquet, "folder": read_folder_rows}[dataset.format]
    try:
        return reader(dataset, url)
    except (TransientReadError, UserError):
        raise
    except Exception as err:  # the bytes were read and are no shard: one record, the job goes on
        return [Sample(SHARD_ERROR_KEY, error=f"unreadable shard: {type(err).__name__}: {err}")]


# --- WebDataset tar ----------------------------------------------------------------------

def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def read_tar(dataset: DatasetConfig, url: str) -> list[Sample]:
    groups: list[tuple[str, dict[str, bytes]]] = []
    cut = None
    with open_input(url, compression="infer") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_member_name(member.name)
                    if not groups or groups[-1][0] != key:
                        groups.append((key, {}))  # before reading, so a cut in this member names this key
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    groups[-1][1][ext] = data
        except BAD_ARCHIVE_ERRORS as err:
            if not groups:
                raise
            cut = err
    samples = [tar_sample(dataset, key, files) for key, files in groups]
    if cut is not None:  # the last sample may be missing files that were past the cut
        last = samples.pop()
        samples.append(Sample(last.key, error=f"truncated shard: cut in or after this sample ({cut})"))
    return mark_duplicates(samples)


def tar_sample(dataset: DatasetConfig, key: str, files: dict[str, bytes]) -> Sample:
    image_exts = dataset.image_column.split(";") if dataset.image_column else IMAGE_EXTENSIONS
    caption_ext = dataset.caption_column or "txt"
    label_ext = dataset.label_column or "cls"
    image = next((files[e] for e in image_exts if e in files), None)
    if image is None:
        return Sample(key, error=f"no image (none of .{', .'.join(image_exts)})")
    metadata = None
    if "json" in files:
        try:
            metadata = json.loads(files["json"])
        except ValueError:
            metadata = None
    label = None
    if label_ext in files:
        try:
            label = int(files[label_ext].decode().strip())
        except ValueError:
            return Sample(key, error=f"label .{label_ext} is not an integer")
    captions = caption_lines(files.get(caption_ext, b"").decode("utf-8", "replace"))
    if not captions:
        return Sample(key, error=f"no caption (.{caption_ext} missing or empty)")
    return Sample(key, image, captions, label, metadata)


def caption_lines(text: str) -> list[str]:
    """Several captions per image are one per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- Parquet -----------------------------------------------------------------------------

def check_columns(dataset: DatasetConfig, url: str) -> None:
    """A Parquet dataset's configured columns against one input file's schema (its footer alone),
    so a misnamed column stops the job before any work, not as a skip record per shard."""
    if dataset.format == "parquet":
        with open_input(url) as f:
            parquet_columns(dataset, pq.ParquetFile(f).schema_arrow.names, url)


def parquet_columns(dataset: DatasetConfig, names: list[str], url: str) -> tuple[str, str, str | None, str | None]:
    """(image, caption, key, label) column names of a Parquet input; UserError naming the key to fix."""
    image_col = pick_column(dataset.image_column, PARQUET_IMAGE_COLUMNS, names, "image_column", url)
    caption_col = pick_column(dataset.caption_column, PARQUET_CAPTION_COLUMNS, names, "caption_column", url)
    key_col = dataset.key_column or ("key" if "key" in names else None)
    label_col = dataset.label_column or ("label" if "label" in names else None)
    for option, column in (("key_column", key_col), ("label_column", label_col)):
        if column is not None and column not in names:
            raise UserError(f"{url}: no column `{column}` (data.*.{option}); columns are {', '.join(names)}")
    return image_col, caption_col, key_col, label_col


def read_parquet(dataset: DatasetConfig, url: str) -> list[Sample]:
    with open_input(url) as f:
        parquet = pq.ParquetFile(f)
        image_col, caption_col, key_col, label_col = parquet_columns(dataset, parquet.schema_arrow.names, url)
        stem = os.path.basename(url).split(".")[0]
        samples, row = [], 0
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group)
            except (OSError, pa.ArrowException) as err:  # TransientReadError is neither: it propagates
                if not samples:
                    raise
                samples.append(Sample(f"{stem}/{row}", error=f"truncated shard: row group {group} unreadable ({err})"))
                break
            for record in table.to_pylist():
                key = str(record.pop(key_col)) if key_col else f"{stem}/{row}"
                samples.append(parquet_sample(record, key, image_col, caption_col, label_col))
                row += 1
    return mark_duplicates(samples)


def parquet_sample(record: dict, key: str, image_col: str, caption_col: str, label_col: str | None) -> Sample:
    image = record.pop(image_col)
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        image = image.get("bytes")
    captions = record.pop(caption_col)
    captions = [c.strip() for c in captions if c and c.strip()] if isinstance(captions, list) else caption_lines(captions or "")
    label = record.pop(label_col, None) if label_col else None
    metadata = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if image is None:
        return Sample(key, error="no image (null)")
    if not captions:
        return Sample(key, error="no caption")
    return Sample(key, image, captions, None if label is None else int(label), metadata or None)


def pick_column(configured: str | None, defaults: tuple[str, ...], names: list[str], option: str, url: str) -> str:
    if configured:
        if configured not in names:
            raise UserError(f"{url}: no column `{configured}` (data.*.{option}); columns are {', '.join(names)}")
        return configured
    for name in defaults:
        if name in names:
            return name
    raise UserError(f"{url}: none of the columns {', '.join(names)} is a known {option} "
                    f"({', '.join(defaults)}); set data.<name>.{option}")


# --- folder + captions file --------------------------------------------------------------

def read_folder_rows(dataset: DatasetConfig, url: str) -> list[Sample]:
    """One row range of the captions file; image paths are relative to the folder."""
    captions_url, _, span = url.partition(FOLDER_ROWS_MARK)
    start, end = (int(x) for x in span.split("-"))
    fs, root = fsspec.core.url_to_fs(_one_path(dataset.urls, "urls"))
    samples = []
    for index, row in enumerate(_read_caption_rows(captions_url)[start:end], start):
        path = row.get("path") or row.get("file") or row.get("image")
        if not path:
            samples.append(Sample(f"row-{index}", error="captions file row has no path"))
            continue
        key = str(row[dataset.key_column]) if dataset.key_column in row else os.path.splitext(path)[0]
        captions = row.get("captions") or row.get("caption") or []
        captions = [c.strip() for c in ([captions] if isinstance(captions, str) else captions) if c and c.strip()]
        label = row.get(dataset.label_column or "label")
        try:
            label = None if label in (None, "") else int(label)
        except ValueError:
            samples.append(Sample(key, error=f"label {label!r} is not an integer"))
            continue
        image = _transient(f"{root.rstrip('/')}/{path}", _cat_or_none, fs, f"{root.rstrip('/')}/{path}")
        if image is None:
            samples.append(Sample(key, error=f"image file missing: {path}"))
            continue
        if not captions:
            samples.append(Sample(key, error="no caption"))
            continue
        samples.append(Sample(key, image, captions, label))
    return mark_duplicates(samples)


def _cat_or_none(fs, path: str) -> bytes | None:
    """A file's bytes; None when it does not exist (a dataset's mistake, not a read failure)."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None


def _one_path(urls: str | list[str], option: str) -> str:
    found = expand_urls(urls)
    if len(found) != 1:
        raise UserError(f"data: a `folder` dataset's {option} must name one path; {urls!r} matches {len(found)} "
                        f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); name one")
    return found[0]


def _read_caption_rows(url: str) -> list[dict]:
    """JSONL: {path, caption | captions, label?}; CSV: path, caption (repeatable column), label."""
    with open_input(url) as f:
        text = f.read().decode("utf-8")
    if url.lower().endswith((".jsonl", ".json")):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise UserError(f"{url}: line {number} is not valid JSON ({err}); captions_file needs one "
                                    f"JSON object per line") from None
        return rows
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    rows = []
    for values in reader:
        row: dict = {"captions": []}
        for name, value in zip(header, values):
            if name.startswith("caption"):
                row["captions"].append(value)
            else:
                row[name] = value
        rows.append(row)
    return rows


def mark_duplicates(samples: list[Sample]) -> list[Sample]:
    """Keys are unique in a cache: a repeated key in one shard keeps its first sample only."""
    seen = set()
    for i, sample in enumerate(samples):
        if sample.error is None:
            if sample.key in seen:
                samples[i] = Sample(sample.key, error="duplicate key in this shard")
            seen.add(sample.key)
    return samples
