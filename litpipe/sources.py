"""Input shards and the samples in each: WebDataset tars, Parquet files, a folder plus captions file.

One definition of what a dataset's shards, samples and keys are: precompute reads samples to embed
them, eval and serve read them back to show the image behind a cached key. Reading a shard never
raises for bad data: a bad sample comes back with an `error`, a truncated tar keeps every sample
before the cut plus one error for the cut, and bytes that are no shard at all are one error
sample, so the caller can account for every sample. Samples stream: a read holds one sample (one
Parquet row group) whatever the shard's size. A failure to *read* bytes (network, store,
disk) is another matter: it raises `TransientReadError`, to be retried, and is never recorded as
bad data.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from litpipe.config import DatasetConfig
from litpipe.errors import UserError
from litpipe.files import NoFilesError, expand_urls
from litpipe.skips import duplicate_reason

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
PARQUET_IMAGE_COLUMNS = ("jpg", "image", "img", "png", "webp", "image_bytes")
FIRST_SAMPLES = 16  # samples of a first shard read before a job starts, to catch an image_column that matches nothing
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
    legacy_text: bool = False  # its caption bytes were not UTF-8 and were read as cp1252/Latin-1


def list_shards(dataset: DatasetConfig) -> list[str]:
    """The dataset's input shard URLs, sorted; for `folder`, row ranges of the captions file."""
    if dataset.format == "clip_benchmark":
        return expand_urls(f"{dataset.urls.rstrip('/')}/*.tar")
    if dataset.format != "folder":
        return expand_urls(dataset.urls)
    if not dataset.captions_file:
        raise UserError("data: a `folder` dataset needs captions_file (JSONL or CSV with path, caption(s), label)")
    captions_url = _one_path(dataset.captions_file, "captions_file")
    _one_path(dataset.urls, "urls")  # image paths are relative to one folder
    rows = len(_read_caption_rows(captions_url)[0])
    step = dataset.shard_rows
    return [f"{captions_url}{FOLDER_ROWS_MARK}{start}-{min(start + step, rows)}" for start in range(0, rows, step)]


def read_shard(dataset: DatasetConfig, url: str) -> list[Sample]:
    """Every sample of one input shard, in input order (`iter_shard` as a list)."""
    return list(iter_shard(dataset, url))


def iter_shard(dataset: DatasetConfig, url: str) -> Iterator[Sample]:
    """The samples of one input shard in input order, streamed: memory holds one sample (one
    Parquet row group), whatever the shard's size. Never raises for bad data; a key seen earlier in
    the shard is an error sample naming the shard ("duplicate key: first in URL").

    Raises TransientReadError when bytes could not be read, UserError for a configuration that
    does not fit the data (a column that is not there).
    """
    reader = {"webdataset": read_tar, "clip_benchmark": read_tar, "parquet": read_parquet,
              "folder": read_folder_rows}[dataset.format]
    seen: set[str] = set()
    try:
        for sample in reader(dataset, url):
            if sample.error is None:
                if sample.key in seen:
                    sample = Sample(sample.key, error=duplicate_reason(url))
                seen.add(sample.key)
            yield sample
    except (TransientReadError, UserError):
        raise
    except Exception as err:  # the bytes were read and are no shard: one record, the job goes on
        yield Sample(SHARD_ERROR_KEY, error=f"unreadable shard: {type(err).__name__}: {err}")


def decode_caption(data: bytes) -> tuple[str, bool]:
    """Caption bytes -> (text, whether a legacy encoding was needed).

    Web alt-texts are mostly UTF-8, but crawls hold cp1252/Latin-1 too; decoding those with
    "replace" would store U+FFFD for every accented letter. cp1252 leaves five bytes undefined,
    which Latin-1 maps, so every byte string decodes.
    """
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), True
    except UnicodeDecodeError:
        return data.decode("latin-1"), True


def split_captions(text: str, split: str) -> list[str]:
    """A caption string -> its captions: itself (`none`, img2dataset's and open_clip's reading of a
    .txt), or one per line (`lines`, data.*.caption_split); blank ones dropped."""
    parts = text.splitlines() if split == "lines" else [text]
    return [part.strip() for part in parts if part.strip()]


# --- WebDataset tar ----------------------------------------------------------------------

def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def read_tar(dataset: DatasetConfig, url: str) -> Iterator[Sample]:
    """A tar's samples as its members stream by: a sample is yielded when the next key starts, so a
    cut in the middle of a sample's files is recorded for that sample, not read as a smaller one."""
    key, files = None, {}
    with open_input(url, compression="infer") as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = split_member_name(member.name)
                    if member_key != key:
                        if key is not None:
                            yield tar_sample(dataset, key, files)
                        key, files = member_key, {}  # before reading, so a cut in this member names this key
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    files[ext] = data
        except BAD_ARCHIVE_ERRORS as err:
            if key is None:
                raise
            yield Sample(key, error=f"truncated shard: cut in or after this sample ({err})")
            return
    if key is not None:
        yield tar_sample(dataset, key, files)


def tar_sample(dataset: DatasetConfig, key: str, files: dict[str, bytes]) -> Sample:
    image_exts = dataset.image_column.split(";") if dataset.image_column else IMAGE_EXTENSIONS
    caption_ext = dataset.caption_column or "txt"
    label_ext = dataset.label_column or "cls"
    image = next((files[e] for e in image_exts if e in files), None)
    if image is None:
        return Sample(key, error=f"no image (none of .{', .'.join(image_exts)}; it has .{', .'.join(sorted(files))})")
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
    text, legacy = decode_caption(files.get(caption_ext, b""))
    captions = split_captions(text, dataset.caption_split)
    return Sample(key, image, captions, label, metadata, legacy_text=legacy)


# --- Parquet -----------------------------------------------------------------------------

def check_inputs(name: str, dataset: DatasetConfig) -> list[str]:
    """The input shards of `data.<name>`, checked before any job starts (`check_columns`); errors name the key."""
    try:
        inputs = list_shards(dataset)
    except NoFilesError as err:
        raise UserError(f"data.{name}.urls: {err}") from None
    check_columns(name, dataset, inputs[0])
    return inputs


def check_columns(name: str, dataset: DatasetConfig, url: str) -> None:
    """A dataset's configured columns against one input file, so a misnamed column stops the job before
    any work, not as a skip record per sample: a Parquet file's schema (its footer alone), the first
    samples of a tar (a dataset none of whose first samples has an image of `image_column` embeds
    nothing), a clip_benchmark set's type against what litpipe reads of it (one label or captions per image)."""
    if dataset.format in ("webdataset", "clip_benchmark"):
        try:
            first = list(itertools.islice(iter_shard(dataset, url), FIRST_SAMPLES))
        except TransientReadError:
            first = []  # the job's read tasks retry it; this check is only a head start
        if first and all((s.error or "").startswith("no image") for s in first):
            raise UserError(f"data.{name}.image_column: {dataset.image_column or 'default'}: "
                            f"{first[0].error.removeprefix('no image ')} in the first {len(first)} sample(s) of {url}; "
                            "set it to the image's extension (e.g. image_column: jpg)")
    if dataset.format == "clip_benchmark":
        kind = _cat_or_none(*fsspec.core.url_to_fs(f"{dataset.benchmark_root}/dataset_type.txt"))
        if kind is not None and kind.decode().strip().lower() not in ("classification", "retrieval"):
            raise UserError(f"data: {dataset.benchmark_root} is a CLIP_benchmark `{kind.decode().strip()}` set; litpipe "
                            "reads classification (.cls) and retrieval (.txt) sets")
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


def read_parquet(dataset: DatasetConfig, url: str) -> Iterator[Sample]:
    """A Parquet file's rows, one row group in memory at a time, turned into samples in slices."""
    with open_input(url) as f:
        parquet = pq.ParquetFile(f)
        image_col, caption_col, key_col, label_col = parquet_columns(dataset, parquet.schema_arrow.names, url)
        stem = os.path.basename(url).split(".")[0]
        row = 0
        for group in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(group)
            except (OSError, pa.ArrowException) as err:  # TransientReadError is neither: it propagates
                if not row:
                    raise
                yield Sample(f"{stem}/{row}", error=f"truncated shard: row group {group} unreadable ({err})")
                return
            for batch in table.to_batches(max_chunksize=256):  # Python objects for 256 rows at a time
                for record in batch.to_pylist():
                    key = str(record.pop(key_col)) if key_col else f"{stem}/{row}"
                    yield parquet_sample(dataset, record, key, image_col, caption_col, label_col)
                    row += 1


def parquet_sample(dataset: DatasetConfig, record: dict, key: str, image_col: str, caption_col: str,
                   label_col: str | None) -> Sample:
    image = record.pop(image_col)
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        image = image.get("bytes")
    captions, legacy = caption_list(record.pop(caption_col), dataset.caption_split)
    label = record.pop(label_col, None) if label_col else None
    metadata = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if image is None:
        return Sample(key, error="no image (null)")
    return Sample(key, image, captions, None if label is None else int(label), metadata or None, legacy_text=legacy)


def caption_list(value, split: str) -> tuple[list[str], bool]:
    """A caption cell (string, bytes, a list of either, or null) -> (captions, whether a legacy
    encoding was needed). A list is several captions already; a string is one unless `split`."""
    items = value if isinstance(value, list) else [value]
    captions, legacy = [], False
    for item in items:
        if isinstance(item, bytes):
            item, was_legacy = decode_caption(item)
            legacy |= was_legacy
        captions += split_captions(item or "", "none" if isinstance(value, list) else split)
    return captions, legacy


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

def read_folder_rows(dataset: DatasetConfig, url: str) -> Iterator[Sample]:
    """One row range of the captions file; image paths are relative to the folder."""
    captions_url, _, span = url.partition(FOLDER_ROWS_MARK)
    start, end = (int(x) for x in span.split("-"))
    fs, root = fsspec.core.url_to_fs(_one_path(dataset.urls, "urls"))
    rows, legacy = _read_caption_rows(captions_url)
    for index, row in enumerate(rows[start:end], start):
        path = row.get("path") or row.get("file") or row.get("image")
        if not path:
            yield Sample(f"row-{index}", error="captions file row has no path")
            continue
        key = str(row[dataset.key_column]) if dataset.key_column in row else os.path.splitext(path)[0]
        captions, _ = caption_list(row.get("captions") or row.get("caption"), dataset.caption_split)
        label = row.get(dataset.label_column or "label")
        try:
            label = None if label in (None, "") else int(label)
        except ValueError:
            yield Sample(key, error=f"label {label!r} is not an integer")
            continue
        image = _transient(f"{root.rstrip('/')}/{path}", _cat_or_none, fs, f"{root.rstrip('/')}/{path}")
        if image is None:
            yield Sample(key, error=f"image file missing: {path}")
        else:  # the row's other fields travel as metadata, its image path under `path` (exports show it)
            extra = {k: v for k, v in row.items() if k not in ("caption", "captions", dataset.label_column or "label")
                     and (isinstance(v, (str, int, float, bool)) or v is None)}
            yield Sample(key, image, captions, label, {**extra, "path": path}, legacy_text=legacy)


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


def _read_caption_rows(url: str) -> tuple[list[dict], bool]:
    """(rows, whether the file was not UTF-8 and was read as cp1252/Latin-1). JSONL: {path, caption
    | captions, label?}; CSV: path, caption (repeatable column), label."""
    with open_input(url) as f:
        text, legacy = decode_caption(f.read())
    rows = []
    if url.lower().endswith((".jsonl", ".json")):
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise UserError(f"{url}: line {number} is not valid JSON ({err}); captions_file needs one "
                                    f"JSON object per line") from None
        return rows, legacy
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    for values in reader:
        row: dict = {"captions": []}
        for name, value in zip(header, values):
            if name.startswith("caption"):
                row["captions"].append(value)
            else:
                row[name] = value
        rows.append(row)
    return rows, legacy
