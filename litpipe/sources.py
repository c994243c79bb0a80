"""Input shards and the samples in each: WebDataset tars, Parquet files, a folder plus captions file.

One definition of what a dataset's shards, samples and keys are: precompute reads samples to embed
them, eval and serve read them back to show the image behind a cached key. An input shard is the
unit of commit, so reading one never raises for bad data: a bad sample comes back with an `error`, a truncated tar keeps every sample before the cut plus one error for the cut,
and an unreadable shard is one error sample. The caller can then account for every sample.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
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
    """Every sample of one input shard, in input order; never raises for bad data."""
    reader = {"webdataset": read_tar, "parquet": read_parquet, "folder": read_folder_rows}[dataset.format]
    try:
        return reader(dataset, url)
    except Exception as err:  # any failure to read the shard at all: one record, the job goes on
        return [Sample(SHARD_ERROR_KEY, error=f"unreadable shard: {type(err).__name__}: {err}")]


# --- WebDataset tar ----------------------------------------------------------------------

def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def read_tar(dataset: DatasetConfig, url: str) -> list[Sample]:
    groups: list[tuple[str, dict[str, bytes]]] = []
    cut = None
    with fsspec.open(url, "rb", compression="infer") as f:
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
        except (tarfile.ReadError, EOFError, OSError) as err:
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

def read_parquet(dataset: DatasetConfig, url: str) -> list[Sample]:
    with fsspec.open(url, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        image_col = pick_column(dataset.image_column, PARQUET_IMAGE_COLUMNS, names, "image_column", url)
        caption_col = pick_column(dataset.caption_column, PARQUET_CAPTION_COLUMNS, names, "caption_column", url)
        key_col = dataset.key_column or ("key" if "key" in names else None)
        label_col = dataset.label_column or ("label" if "label" in names else None)
        for column in (key_col, label_col):
            if column is not None and column not in names:
                raise UserError(f"{url}: no column `{column}`; columns are {', '.join(names)}")
        stem = os.path.basename(url).split(".")[0]
        samples, row = [], 0
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group)
            except (OSError, pa.ArrowException) as err:
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
        try:
            image = fs.cat_file(f"{root.rstrip('/')}/{path}")
        except FileNotFoundError:
            samples.append(Sample(key, error=f"image file missing: {path}"))
            continue
        if not captions:
            samples.append(Sample(key, error="no caption"))
            continue
        samples.append(Sample(key, image, captions, label))
    return mark_duplicates(samples)


def _one_path(urls: str | list[str], option: str) -> str:
    found = expand_urls(urls)
    if len(found) != 1:
        raise UserError(f"data: a `folder` dataset's {option} must name one path; {urls!r} matches {len(found)} "
                        f"({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}); name one")
    return found[0]


def _read_caption_rows(url: str) -> list[dict]:
    """JSONL: {path, caption | captions, label?}; CSV: path, caption (repeatable column), label."""
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        text = f.read()
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
