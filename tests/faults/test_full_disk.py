"""precompute into a store whose disk fills up: a clear error naming the path, nothing half
committed, and the run after space is freed completes the same cache as a disk that never filled.

The disk is a 2 MiB tmpfs (mounting one needs root or CAP_SYS_ADMIN; else the test is skipped
with that reason), nearly filled by a ballast file so that a few parts commit and the rest fail.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from litpipe.store.maintenance import verify
from litpipe.config import validate_config
from litpipe.precompute import stage
from litpipe.precompute.results import PrecomputeIncomplete
from litpipe.store.cache import EmbeddingCache

from checks import assert_same_cache, record
from precompute_samples import build_planted_dataset, planted_config

pytestmark = [pytest.mark.slow, pytest.mark.faults]
ROOM = 48 * 1024  # bytes left free: a few parts' data files and records (tmpfs counts whole 4 KiB pages)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): this test needs root or CAP_SYS_ADMIN")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_parts_it_hits_naming_the_path_and_the_run_after_freeing_space_completes(
        ray_local, tmp_path, small_disk):
    build_planted_dataset(tmp_path / "data")
    reference = EmbeddingCache.open(stage.run(validate_config(planted_config(
        tmp_path / "data", str(tmp_path / "reference"), precompute={"rows_per_commit": 2}))).datasets["train"].cache_url)
    stat = os.statvfs(small_disk)
    (small_disk / "ballast").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - ROOM))
    cfg = validate_config(planted_config(tmp_path / "data", str(small_disk / "store"), precompute={"rows_per_commit": 2}))

    summary = stage.run(cfg)
    result = summary.datasets["train"]
    assert result.failed_inputs and not result.complete
    with pytest.raises(PrecomputeIncomplete, match=rf"No space left on device: '{small_disk}/store/.*\.(parquet|tmp-\w+)'"
                                                   r".*rerun `litpipe precompute`"):
        summary.raise_if_incomplete()
    partial = EmbeddingCache.open(result.cache_url)
    assert all("orphan" in p or "temporary" in p for p in verify(partial))  # every committed part whole
    assert not partial.committed_inputs() & set(result.failed_inputs)

    (small_disk / "ballast").unlink()
    again = stage.run(cfg).datasets["train"]
    assert again.complete and again.inputs_processed == len(result.failed_inputs)
    assert_same_cache(EmbeddingCache.open(again.cache_url), reference)
    record("precompute", f"store disk full ({len(result.failed_inputs)} of {result.inputs} inputs hit it)",
           "those inputs failed uncommitted, the path named; the rerun after freeing space finished the cache")
