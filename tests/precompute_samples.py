"""Real image bytes, tar shards, configs and the planted-bad-input dataset for the precompute tests (tiny, deterministic)."""

from __future__ import annotations

import io
import tarfile

from pathlib import Path

import numpy as np
from PIL import Image

from conftest import TINY_ARCHITECTURE
from litpipe.store.parts import open_part
from litpipe.store.cache import EmbeddingCache, decode_embeddings

TINY_MODEL = "litpipe-test-tiny-vit"


def image_bytes(seed: int, size=(40, 30), mode="RGB", fmt="PNG") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(out, fmt)
    return out.getvalue()


def encode_image(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def write_tar(target, members: list[tuple[str, bytes]]) -> None:
    """To a path or an open binary file."""
    opened = tarfile.open(fileobj=target, mode="w") if hasattr(target, "write") else tarfile.open(target, "w")
    with opened as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def sample_members(key: str, image: bytes | None, caption: str | None = None, label: int | None = None,
                   ext: str = "png") -> list[tuple[str, bytes]]:
    """img2dataset's layout: {key}.png + .txt + .json (+ .cls)."""
    members = [] if image is None else [(f"{key}.{ext}", image)]
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    members.append((f"{key}.json", b'{"source": "test"}'))
    if label is not None:
        members.append((f"{key}.cls", str(label).encode()))
    return members


def tiny_config(data: dict, root: str, **sections) -> dict:
    return {"data": data, "encoder": {"model": TINY_MODEL, "architecture": TINY_ARCHITECTURE},
            "store": {"root": root}, "precompute": {"batch_size": 8}, **sections}


GOOD_RGB = [f"plain/{i}" for i in range(5)]
ODD_MODES = {  # converted, not skipped
    "odd/grey": encode_image(Image.new("L", (30, 20), 90), "PNG"),
    "odd/palette": encode_image(Image.open(io.BytesIO(image_bytes(5))).convert("P"), "PNG"),
    "odd/cmyk": encode_image(Image.new("CMYK", (24, 24), (10, 200, 30, 0)), "JPEG"),
    "odd/grey16": encode_image(Image.fromarray(np.full((20, 20), 40000, np.uint16)), "PNG"),
    "odd/alpha": encode_image(Image.open(io.BytesIO(image_bytes(6))).convert("RGBA"), "PNG"),
}
BAD_IMAGES = {
    "bad/undecodable": b"this is not an image at all",
    "bad/zero-byte": b"",
    "bad/truncated": image_bytes(7, size=(64, 64))[:200],
    "bad/bomb": encode_image(Image.new("L", (3000, 2000)), "PNG"),
}
PLANTED_ERRORS = len(BAD_IMAGES) + 3  # + a key of an earlier shard, a truncated tar's cut,
# an unreadable shard


def build_planted_dataset(folder: Path) -> list[str]:
    """Four real tar shards holding every kind of bad input; returns the good keys."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tar(folder / "train-000000.tar", [m for i, key in enumerate(GOOD_RGB)
                                            for m in sample_members(key, image_bytes(i), f"caption {i}\nalt {i}", label=i)])
    odd = [m for key, data in ODD_MODES.items() for m in sample_members(key, data, f"odd {key}")]
    bad = [m for key, data in BAD_IMAGES.items() for m in sample_members(key, data, f"bad {key}")]
    again = sample_members("plain/2", image_bytes(20), "a later copy of plain/2")  # kept in train-000000.tar only
    write_tar(folder / "train-000001.tar", odd + bad + sample_members("odd/no-caption", image_bytes(8), None) + again)
    cut_members = [m for i in range(3) for m in sample_members(f"cut/{i}", image_bytes(10 + i, size=(64, 64)), f"cut {i}")]
    write_tar(folder / "train-000002.tar", cut_members)
    data = (folder / "train-000002.tar").read_bytes()
    (folder / "train-000002.tar").write_bytes(data[:data.index(image_bytes(12, size=(64, 64))) + 50])
    (folder / "train-000003.tar").write_bytes(b"\x00not a tar" * 64)
    return GOOD_RGB + list(ODD_MODES) + ["odd/no-caption", "cut/0", "cut/1"]  # an image without a caption is kept


def planted_config(data_dir: Path, root: str, **sections) -> dict:
    raw = tiny_config({"train": {"format": "webdataset", "urls": str(data_dir / "train-*.tar"), "caption_split": "lines"}},
                      root, **sections)
    raw["precompute"].update(max_image_pixels=1_000_000, batch_size=4)
    return raw


def cache_rows(cache: EmbeddingCache) -> dict:
    """key -> row of the committed shards, read straight from their Parquet files."""
    rows = {}
    for record in cache.parts():
        table = open_part(cache, record).read()
        vectors = decode_embeddings(table.column("embedding"), cache.dim, cache.embedding_dtype)
        for row, vector in zip(table.drop_columns(["embedding"]).to_pylist(), vectors):
            assert row["key"] not in rows, f"key {row['key']} committed twice"
            rows[row["key"]] = {**row, "embedding": vector}
    return rows
