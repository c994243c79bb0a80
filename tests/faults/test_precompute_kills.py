"""precompute killed with SIGKILL at seeded points, then run again: the cache equals an uninterrupted run's.

The dataset is the planted one (every kind of bad input) cut into parts of two samples, so a kill
lands between parts of one shard as well as between shards. `make test-long` runs one fixed point
(between a part's data file and its commit record); `make test-faults` adds one inside finalize,
24 drawn ones (seed 16: 20 that kill the job, 4 that kill only the encoder actor writing a part),
a rerun started while the killed run's Ray processes still live, and two runs at once.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from litpipe.config import validate_config
from litpipe.precompute import stage
from litpipe.store.cache import EmbeddingCache

from checks import assert_same_cache, record
from harness import KillPoint, draw_points, kill_session, python_command, run_killed, trace
from precompute_samples import planted_config

pytestmark = pytest.mark.slow
COMMIT_RECORD = "write_temp<write_exclusive<commit_part open store/*/commits/train-*-*-p*.json.tmp-*"
FINALIZE_MANIFEST = "write_atomic<finalize<finish replace store/*/manifest.json"
QUICK = [KillPoint(COMMIT_RECORD, 3, "before"), KillPoint(FINALIZE_MANIFEST, 1, "before")]
DRAWN, WORKER_KILLS, SEED = 20, 4, 16


@pytest.fixture(scope="module")
def reference(planted_in_parts):
    """The uninterrupted run every killed one is compared with; its data folder is every run's input."""
    return planted_in_parts


@pytest.fixture(scope="module")
def drawn(reference):
    """The full run's points, drawn from the file events of an uninterrupted run in a subprocess."""
    base = reference["base"]
    events = trace(command(base, base / "traced"), base / "traced", base / "traced-work")
    cover = {"commit_part": 8, "finalize": 4, "open_or_create": 2}
    job = draw_points(events, DRAWN, SEED, cover)
    actor = draw_points([e for e in events if "PartEncoder" in e], WORKER_KILLS, SEED, {}, target="process")
    return job + actor


def config(base, out) -> dict:
    return planted_config(base / "data", str(out / "store"), ray={"num_cpus": 2}, precompute={"rows_per_commit": 2})


def command(base, out) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.yaml").write_text(yaml.safe_dump(config(base, out)))
    return python_command("-m", "litpipe.cli", "precompute", str(out / "pipeline.yaml"))


def kill_and_rerun(reference, point: KillPoint, name: str, rerun_in_subprocess: bool = False) -> None:
    base = reference["base"]
    out = base / name
    killed = run_killed(command(base, out), out, point, base / f"{name}-work")
    assert killed.hit is not None, f"the run ended before {point}: {killed.stderr[-2000:]}"
    if point.target == "job" or killed.hit["pid"] == killed.hit["driver"]:
        assert killed.returncode == -9
    cfg = validate_config(config(base, out))
    if rerun_in_subprocess:  # a new driver while the killed run's Ray processes still live
        assert killed.leftovers, "expected the killed run's Ray processes to outlive it"
        try:
            trace(command(base, out), out, base / f"{name}-rerun")
        finally:
            kill_session(killed.hit["driver"])
    else:
        kill_session(killed.hit["driver"])  # they would only take CPU from the rerun
        if killed.returncode != 0:
            stage.run(cfg)
    cache = EmbeddingCache.find(cfg.store.root, reference["cache"].manifest["encoder"], reference["cache"].manifest["dataset"])
    assert_same_cache(cache, reference["cache"])
    outcome = ("finished by itself after Ray restarted the actor" if killed.returncode == 0 else
               "killed; the next run finished the cache")
    record("precompute", f"SIGKILL {point}", outcome)


@pytest.mark.long
def test_a_kill_between_a_parts_data_file_and_its_commit_record_is_finished_by_the_next_run(reference):
    kill_and_rerun(reference, QUICK[0], "quick-commit")


@pytest.mark.faults
def test_a_kill_inside_finalize_is_finished_by_the_next_run(reference):
    kill_and_rerun(reference, QUICK[1], "quick-finalize")


@pytest.mark.faults
def test_a_new_driver_started_beside_the_killed_runs_ray_processes_finishes_the_cache(reference):
    kill_and_rerun(reference, QUICK[0], "beside-leftovers", rerun_in_subprocess=True)


@pytest.mark.faults
@pytest.mark.parametrize("index", range(DRAWN + WORKER_KILLS))
def test_a_kill_at_a_drawn_point_is_finished_by_the_next_run(reference, drawn, index):
    kill_and_rerun(reference, drawn[index], f"drawn-{index}")



@pytest.mark.faults
def test_two_runs_started_at_once_on_one_cache_commit_every_part_once(reference):
    """Two people start the same job at the same moment: both finish, and the cache is the one cache."""
    base = reference["base"]
    out = base / "two-at-once"
    runs = [subprocess.Popen(command(base, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [e[-2000:] for e in errors]
    cfg = validate_config(config(base, out))
    cache = EmbeddingCache.find(cfg.store.root, reference["cache"].manifest["encoder"], reference["cache"].manifest["dataset"])
    assert_same_cache(cache, reference["cache"])
    record("precompute", "two runs started at once on one cache", "both exit 0; every part committed once")
