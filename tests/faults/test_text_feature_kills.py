"""The text-feature precompute SIGKILLed mid-way, then run again: the cache ends bit-identical to an
uninterrupted build (each shard's features are published whole, by one atomic replace, and encoded in the
same batches on every run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import head_config

from litpipe.config import validate_config
from litpipe.files import TEMP_MARK
from litpipe.store import resolve_cache
from litpipe.train_text.text_feature_job import ensure_text_features

from harness import KillPoint, kill_session, python_command, run_killed, trace

pytestmark = pytest.mark.long


def copy_of_the_cache(tiny_cache, text_models, name: str) -> dict:
    """A config over a copy of the tiny cache's store, its own text-feature cache to build."""
    raw = head_config(tiny_cache, name, text_models)
    store = Path(raw["workdir"]) / "store"
    shutil.copytree(raw["store"]["root"], store)
    for built in store.rglob("text_features"):  # other tests' builds: this one starts from none
        shutil.rmtree(built)
    raw["store"]["root"], raw["ray"] = str(store), {"num_cpus": 2}
    return raw


def command(raw: dict) -> list[str]:
    path = Path(raw["workdir"]) / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return python_command("-m", "litpipe.cli", "text-features", str(path))


def feature_files(raw: dict) -> dict[str, bytes]:
    """The published files (a kill between a write and its rename leaves a `.tmp-` file, which nothing reads)."""
    folder = Path(resolve_cache(validate_config(raw), "train").path) / "text_features"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and TEMP_MARK not in p.name}


def test_a_killed_text_feature_precompute_finishes_bit_identical(ray_local, tiny_cache, text_models):
    reference = copy_of_the_cache(tiny_cache, text_models, "features-reference")
    work = Path(reference["workdir"]) / "trace"
    events = trace(command(reference), Path(reference["store"]["root"]), work)
    published = [e for e in events if "text_features" in e and " replace " in e]
    assert len(published) == 3  # two shard files, then the manifest
    for n, point in enumerate([KillPoint(published[0], 1, "after"),  # one file published, one not begun
                               KillPoint(next(e for e in events if "text_features" in e and " write " in e), 2, "torn")]):
        raw = copy_of_the_cache(tiny_cache, text_models, f"features-killed-{n}")
        killed = run_killed(command(raw), Path(raw["store"]["root"]), point, Path(raw["workdir"]) / "work")
        assert killed.hit is not None, f"the run ended before {point}: {killed.stderr[-2000:]}"
        kill_session(killed.hit["driver"])
        assert killed.returncode == -9
        assert len([f for f in feature_files(raw) if f.endswith(".parquet")]) < 2  # it was cut short
        ensure_text_features(validate_config(raw), resolve_cache(validate_config(raw), "train"))
        assert feature_files(raw) == feature_files(reference)
