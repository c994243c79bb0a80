"""The GPU runbook's dry run: the same command and code on CPU with tiny models, so it cannot rot between the
sessions that are lent a GPU. The whole dry run is a minute on 2 cores: it is in `make test-long`, which CI runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.long
def test_the_device_runbook_runs_every_part_on_cpu_and_writes_its_json_and_table(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench" / "device" / "run.sh"), "--dry-run"], cwd=ROOT, timeout=500,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    results = json.loads((tmp_path / "device.json").read_text())
    assert results["dry_run"] and "CPUs" in results["machine"]
    parts = results["parts"]
    assert len(parts) == 5 and not [name for name, figures in parts.items() if "error" in figures]
    precompute = parts["precompute tiny, JPEG decode on CPU"]
    assert precompute["pipeline"] > 0 and precompute["bare_forward"] > 0
    assert parts["parity, 8 images"]["cosine_min"] > 0.99  # fp32 both sides here: tensor against pil path
    assert set(parts["train text tower, GradCache"]["batches"]) == {"64", "128"}
    assert parts["cached vs on the fly"]["cached"] > 0
    assert "dry run" in (tmp_path / "device.md").read_text()


@pytest.mark.long
def test_the_runbooks_training_epoch_reads_every_row_of_a_cache_built_by_the_store(tmp_path):
    """`run.sh --epoch` (#40's epoch over 10M rows on a GPU) on CPU: 10,000 rows at 2,048, so 4 steps."""
    done = subprocess.run(["bash", str(ROOT / "bench" / "device" / "run.sh"), "--dry-run", "--epoch"], cwd=ROOT,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    (figures,) = json.loads((tmp_path / "epoch.json").read_text())["parts"].values()
    assert figures["rows"] == 10_000 and figures["train"]["rc"] == 0 and figures["train"]["steps"] == 4
    assert 0 <= figures["train"]["data_wait_median"] < 1 and figures["train"]["samples_per_s_median"] > 0


def test_a_missing_package_is_named_with_how_to_carry_it(tmp_path):
    code = "import sys; sys.modules['open_clip'] = None; sys.argv = ['runbook', '--check']; " \
           f"sys.path.insert(0, {str(ROOT / 'bench' / 'device')!r}); import runbook; sys.exit(runbook.main())"
    done = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert done.returncode == 3 and "missing on this machine: open_clip" in done.stdout and "wheels.sh" in done.stdout
