"""A read task's memory is bounded by `precompute.part_bytes` whatever the images' sizes and
rows_per_commit: parts are cut by their images' bytes, from headers, the same way on every run."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
from PIL import Image

from litpipe.config import DatasetConfig, PrecomputeConfig
from litpipe.models.cpu_pixels import CpuPixels
from litpipe.images import decode_image
from litpipe.precompute.read import cut_parts, load_part, read_parts, sample_bytes
from litpipe.sources import Sample, iter_shard
from precompute_samples import encode_image, image_bytes, sample_members, write_tar

MIB = 2**20


def photo(seed: int, size=(1600, 1200)) -> bytes:
    """A smooth JPEG: small on disk (tens of kB), 5.8 MB decoded, 1.4 MB after the tensor path's shrink."""
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    pixels = np.stack([x * 255, y * 255, np.full_like(x, (seed * 37) % 255)], axis=-1).astype(np.uint8)
    return encode_image(Image.fromarray(pixels), "JPEG")


CHILD = """
import json, resource, sys
import pyarrow as pa
from litpipe.config import DatasetConfig
from litpipe.models.cpu_pixels import CpuPixels
from litpipe.precompute.read import read_parts
url, budget = sys.argv[1], int(sys.argv[2])
row = pa.table({"dataset": ["d"], "input": [url], "skip": [[]]})
def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
before, sizes, rows = peak(), [], 0
for table in read_parts(row, {"d": DatasetConfig(format="webdataset", urls=url)}, {"d": 4096},
                        CpuPixels("tensor", (224, 224), []), 10**9, False, yield_cpu=False, read_retries=0,
                        part_bytes={"d": budget}):
    sizes.append(table["payload"][0].as_buffer().size + table["buffers"][0].values.buffers()[2].size)
    del table  # as Ray Data does: the part goes to the object store, the task keeps no reference
print(json.dumps({"before": before, "peak": peak(), "payloads": sizes}))
"""


def test_a_read_task_holds_about_twice_part_bytes_whatever_rows_per_commit(tmp_path):
    """150 photos of 1600x1200 (216 MB after the tensor path's shrink) in one shard, rows_per_commit
    4,096: without a byte bound the task holds them all, and their pickle (over 430 MB); with
    part_bytes 16 MiB it holds about 2 x 16 MiB plus one image being decoded."""
    images = [photo(i) for i in range(150)]
    write_tar(tmp_path / "s.tar", [m for i, image in enumerate(images) for m in sample_members(f"k{i:03d}", image, "c", ext="jpg")])
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "s.tar"), str(16 * MIB)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["payloads"]) >= 13 and max(out["payloads"]) <= 16 * MIB
    assert out["peak"] - out["before"] < 3 * 16 * MIB, out


def test_the_default_bounds_a_16_cpu_node_reading_multi_megapixel_photos():
    """15 read tasks (one per CPU beside the encoder) of 24-megapixel originals stay well inside a
    128 GB node: each holds up to 3 x part_bytes (measured: 2.9x with one 1600x1200 photo decoding,
    above) plus one 24-megapixel image decoded before its shrink."""
    budget = PrecomputeConfig().part_bytes
    one_image = 6000 * 4000 * 3
    assert 15 * (3 * budget + one_image) < 16 * 2**30


def test_parts_are_cut_by_bytes_from_headers_and_a_resumed_task_skips_parts_without_decoding(tmp_path):
    pixels = CpuPixels("tensor", (32, 32), [])
    small, large = image_bytes(0, size=(40, 30)), image_bytes(1, size=(300, 200), fmt="JPEG")
    samples = [Sample(f"k{i:02d}", large if i % 3 == 0 else small, ["c"]) for i in range(30)]
    samples.insert(7, Sample("bad", b"not an image", ["c"]))
    sizes = [sample_bytes(s, pixels) for s in samples]
    assert sizes[0] == len(large) + 100 * 67 * 3 and sizes[1] == len(small) + 40 * 30 * 3 and sizes[7] == 12
    budget = 2 * sizes[0]
    parts = [p for _, p, _ in cut_parts(iter(samples), 1000, budget, lambda s: sample_bytes(s, pixels))]
    assert [s.key for p in parts for s in p] == [s.key for s in samples]
    assert all(sum(sample_bytes(s, pixels) for s in p) <= budget for p in parts) and len(parts) > 3
    assert [len(p) for _, p, _ in cut_parts(iter(samples), 4)] == [4] * 7 + [3]  # no budget: rows alone

    write_tar(tmp_path / "s.tar", [m for s in samples for m in sample_members(s.key, s.image, "c", ext="jpg")])
    dataset = {"d": DatasetConfig(format="webdataset", urls=str(tmp_path / "s.tar"))}
    args = (dataset, {"d": 1000}, pixels, 10**8, False)

    def read(skip):
        row = pa.table({"dataset": ["d"], "input": [str(tmp_path / "s.tar")], "skip": [skip]})
        return {t["part"][0].as_py(): load_part(t["payload"][0], t["buffers"][0])
                for t in read_parts(row, *args, yield_cpu=False, read_retries=0, part_bytes={"d": budget})}

    whole = read([])
    assert [k for n in sorted(whole) for k in whole[n].keys] == [s.key for s in samples if s.key != "bad"]
    assert len(whole) == len(parts)
    resumed = read([0, 2])
    assert sorted(resumed) == [n for n in sorted(whole) if n not in (0, 2)]
    for n, part in resumed.items():
        assert part.keys == whole[n].keys and all(np.array_equal(a, b) for a, b in zip(part.pixels, whole[n].pixels))
    assert len(list(iter_shard(dataset["d"], str(tmp_path / "s.tar")))) == 31

    # a resume under another precompute.max_image_pixels (one that skips the large images) cuts the same parts
    bounded = (dataset, {"d": 1000}, pixels, 300 * 200 - 1, False)
    row = pa.table({"dataset": ["d"], "input": [str(tmp_path / "s.tar")], "skip": [[]]})
    cut = [load_part(t["payload"][0], t["buffers"][0])
           for t in read_parts(row, *bounded, yield_cpu=False, read_retries=0, part_bytes={"d": budget})]
    assert [len(p.keys) + len(p.errors) for p in cut] == [len(whole[n].keys) + len(whole[n].errors) for n in sorted(whole)]


def test_a_sample_weighs_the_pixels_its_decode_makes_with_and_without_jpeg_draft():
    """sample_bytes, from the header alone, is the encoded bytes plus exactly what the CPU step holds
    after decoding: on tensor with libjpeg's draft the decode is larger than the full image's
    integer shrink would be (1800x1400 drafts to 900x700 for a 448 side, where the shrink gives 600x467)."""
    data = photo(0, size=(1800, 1400))
    for pixels in (CpuPixels("tensor", (224, 224), []), CpuPixels("tensor", (224, 224), [], draft_to=448)):
        held = pixels.cpu(decode_image(data, 10**9, pixels.draft_to)).nbytes
        assert sample_bytes(Sample("k", data, ["c"]), pixels) == len(data) + held
    assert held == 900 * 700 * 3
