"""`litpipe sweep`: trials drawn and checked on the driver, run side by side on Ray Tune over caches built
once, each equal to the same settings run alone, resumed after a kill without rerunning what finished."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import raw_config
from litpipe.config import ConfigError
from litpipe.sweep.spec import SweepFile, draw_trials, load_sweep

SPACE = {"train.lr": [0.001, 0.003], "train.seed": [0, 1]}


def sweep_file(folder: Path, tiny_cache, name="sweep", **fields) -> Path:
    """A base pipeline.yaml over `tiny_cache` with an eval set, and a sweep file beside it."""
    raw = raw_config(tiny_cache["tmp"], eval_every=2)
    raw["eval"] = {"retrieval": ["train"], "ks": [1, 5]}
    raw["workdir"] = str(folder / "run")
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    spec = {"base": "pipeline.yaml", "space": SPACE, "metric": "retrieval/train/image_retrieval_recall@5",
            "concurrent": 2, **fields}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder / f"{name}.yaml"


def test_a_grid_is_every_combination_per_arm_and_random_search_draws_the_same_trials_again():
    grid = draw_trials(SweepFile(base="p.yaml", arms={"L": {}, "control": {"train.shuffle_captions": True}}, space=SPACE))
    assert [t.name for t in grid][:2] == ["000-L-lr=0.001,seed=0", "001-L-lr=0.001,seed=1"] and len(grid) == 8
    assert grid[4].settings == {"train.shuffle_captions": True, "train.lr": 0.001, "train.seed": 0}
    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.tower.lit": ["LU", "Lu"], "train.steps": {"randint": [2, 5]}}
    drawn = draw_trials(SweepFile(base="p.yaml", space=space, search="random", samples=6, seed=3))
    assert [t.settings for t in drawn] == [t.settings for t in draw_trials(SweepFile(base="p.yaml", space=space,
                                                                                     search="random", samples=6, seed=3))]
    assert all(1e-4 <= t.settings["train.lr"] <= 1e-2 and 2 <= t.settings["train.steps"] < 5 for t in drawn)
    with pytest.raises(ConfigError, match="space.train.lr is a distribution: set search: random"):
        draw_trials(SweepFile(base="p.yaml", space={"train.lr": {"uniform": [0, 1]}}))


def test_each_trial_writes_under_its_own_folder_and_checkpoints_under_its_own_name(tiny_cache, tmp_path):
    path = sweep_file(tmp_path, tiny_cache, arms={"a": {}, "b": {"train.checkpoint_dir": str(tmp_path / "ckpt")}}, space={})
    sweep = load_sweep(str(path))
    a, b = (sweep.config(t) for t in sweep.trials)
    assert a.workdir == f"{tmp_path}/run/sweeps/sweep/trials/000-a" and a.train.checkpoint_dir is None
    assert b.train.checkpoint_dir == f"{tmp_path}/ckpt/001-b"


def test_a_misspelt_key_names_the_trial_and_the_key_before_anything_starts(tiny_cache, tmp_path):
    path = sweep_file(tmp_path, tiny_cache, space={"train.lrr": [0.1]})
    with pytest.raises(ConfigError, match=r"trial 000-base-lrr=0.1 .*train.lrr.*did you mean train.lr"):
        load_sweep(str(path))


@pytest.mark.long
def test_four_trials_two_at_a_time_equal_litpipe_run_alone_and_build_the_token_cache_once(ray_local, tiny_cache, tmp_path):
    from litpipe.run import run_pipeline
    from litpipe.store import resolve_cache
    from litpipe.sweep.runner import prepare, tune_trials
    from litpipe.sweep.table import write_results

    sweep = load_sweep(str(sweep_file(tmp_path, tiny_cache)))
    prepare(sweep)  # the driver builds the one token cache all four trials read
    cache = resolve_cache(sweep.config(sweep.trials[0]), "train", None)
    tokens = sorted(p for p in Path(cache.url, "tokens").rglob("*") if p.is_file())
    built = {p: p.stat().st_mtime_ns for p in tokens}
    assert len({p.relative_to(Path(cache.url, "tokens")).parts[0] for p in tokens}) == 1
    results = write_results(sweep, tune_trials(sweep, restart=False))
    assert {p: p.stat().st_mtime_ns for p in tokens} == built  # no trial built it again
    assert [r["status"] for r in results["trials"]] == ["done"] * 4 and results["best"] in {t.name for t in sweep.trials}
    table = (Path(sweep.out) / "sweep.md").read_text()
    assert "| chance |" in table and all(t.name in table for t in sweep.trials)
    assert (Path(sweep.out) / "sweep.png").stat().st_size > 10_000 and any(Path(sweep.out, "tensorboard").rglob("events.*"))
    alone = sweep.config(sweep.trials[3]).model_copy(update={"workdir": str(tmp_path / "alone")})
    summary = run_pipeline(alone)  # `litpipe run` with the trial's settings
    assert summary.eval.metrics == pytest.approx(results["trials"][3]["metrics"], abs=1e-6)


@pytest.mark.long
def test_a_sweep_killed_after_its_first_trial_resumes_without_rerunning_it(tiny_cache, tmp_path):
    path = sweep_file(tmp_path, tiny_cache, concurrent=1)
    (tmp_path / "ray").mkdir()
    command = [sys.executable, "-m", "litpipe", "-q", "sweep", str(path)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    trials = tmp_path / "run" / "sweeps" / "sweep" / "trials"
    finished = trials / "000-base-lr=0.001,seed=0" / "eval" / "eval.json"
    deadline = time.time() + 240
    while not finished.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    assert finished.exists(), first.communicate()[0][-3000:] if first.poll() is not None else "no trial finished in time"
    time.sleep(1.0)  # Ray Tune records the trial's result
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    stamp = finished.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "sweeps" / "sweep" / "sweep.json").read_text())
    assert [r["status"] for r in results["trials"]] == ["done"] * 4
    assert finished.stat().st_mtime_ns == stamp  # the finished trial was not run again


@pytest.mark.long
def test_a_random_search_under_asha_stops_trials_early_and_still_reports_every_one(ray_local, tiny_cache, tmp_path):
    from litpipe.sweep.runner import run_sweep

    path = sweep_file(tmp_path, tiny_cache, space={"train.lr": {"loguniform": [1e-4, 1e-1]}}, search="random", samples=4,
                      arms={"L": {"train.steps": 8, "train.eval_every": 2}}, asha={"grace_period": 1, "reduction_factor": 2})
    results = run_sweep(str(path))
    statuses = [r["status"] for r in results["trials"]]
    assert set(statuses) <= {"done", "stopped"} and "done" in statuses and "stopped" in statuses, statuses
    assert all(r["metrics"] for r in results["trials"])  # a stopped trial keeps its last evaluation


@pytest.mark.long
def test_a_failing_trial_is_reported_with_its_error_and_the_others_finish(ray_local, tiny_cache, tmp_path):
    from litpipe.sweep.runner import tune_trials
    from litpipe.sweep.table import write_results

    path = sweep_file(tmp_path, tiny_cache, space={}, arms={"fits": {}, "too-big": {"train.batch_size": 4096}})
    sweep = load_sweep(str(path))
    results = write_results(sweep, tune_trials(sweep, restart=False))
    fits, too_big = results["trials"]
    assert fits["status"] == "done" and fits["metrics"]
    assert too_big["status"] == "failed" and "lower the batch size" in too_big["error"]
    assert "failed: " in (Path(sweep.out) / "sweep.md").read_text()
