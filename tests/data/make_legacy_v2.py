"""How tests/data/legacy-v2.tar.gz was made: a cache written by litpipe as of commit 994608c (format
version 2, whose id spelled `encoder.pretrained` as the config wrote it), with a token cache beside it.

Run with that commit's litpipe first on the path (`pip install --no-deps --target /tmp/oldlib <checkout
of 994608c>`, then `PYTHONPATH=/tmp/oldlib python tests/data/make_legacy_v2.py`). Its input URLs are
absolute, so tests extract it at the same place (ROOT); the tar keeps the shard's mtime, which the
dataset fingerprint records.
"""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip  # saves the tower as a user's open_clip checkpoint
import torch
import yaml
from PIL import Image

ROOT = Path("/tmp/litpipe-legacy-v2")
ARCHITECTURE = {"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
WORDS = ["red", "blue", "cat", "dog", "face", "tree", "flag", "moon"]


def main() -> None:
    (ROOT / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(ROOT / "data" / "shard-0.tar", "w") as tar:
        for i in range(24):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(png, "PNG")
            for ext, data in (("png", png.getvalue()), ("txt", " ".join(rng.choice(WORDS, 3)).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    os.utime(ROOT / "data" / "shard-0.tar", (1_700_000_000, 1_700_000_000))
    torch.manual_seed(0)
    model = open_clip.CLIP(**ARCHITECTURE)
    torch.save({"state_dict": model.state_dict()}, ROOT / "tower.pt")
    config = {"workdir": "runs", "data": {"train": {"format": "webdataset", "urls": "data/shard-*.tar"}},
              "encoder": {"model": "litpipe-legacy-tiny", "pretrained": "tower.pt", "architecture": ARCHITECTURE,
                          "precision": "fp32"},
              "store": {"root": "store", "embedding_dtype": "float32"},
              "precompute": {"batch_size": 8, "rows_per_commit": 16},
              "train": {"tower": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}, "batch_size": 8,
                        "chunk_size": 4, "steps": 2, "lr": 1e-3}}
    (ROOT / "pipeline.yaml").write_text(yaml.safe_dump(config))
    for command in ("precompute", "train"):
        subprocess.run([sys.executable, "-m", "litpipe", "-q", command, "pipeline.yaml"], cwd=ROOT, check=True)
    with tarfile.open(Path(__file__).with_name("legacy-v2.tar.gz"), "w:gz") as tar:
        for name in ("data", "tower.pt", "pipeline.yaml", "store"):
            tar.add(ROOT / name, arcname=name)


if __name__ == "__main__":
    main()
