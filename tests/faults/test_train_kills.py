"""Training killed with SIGKILL at seeded points, then resumed: the same run as one never stopped.

Resumed means `litpipe train --resume` when a checkpoint was written before the kill (else the
run is started again, as the error of `--resume` says). Each resumed run must log the same loss,
learning rate, gradient norm and temperature at every step, each step once (in metrics.jsonl and
in TensorBoard); end with bit-identical
weights; and leave its checkpoint folder holding latest.json and the newest step files only.
`make test` runs two fixed points (a step file torn; killed between latest.json's temporary file
and its rename); `make test-faults` adds 24 drawn ones (seed 16).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_train_config

from litpipe.config import validate_config
from litpipe.train_text.trainer import train

from checks import record, training_outcome
from harness import KillPoint, draw_points, kill_session, python_command, run_killed, trace

pytestmark = pytest.mark.slow
STEPS, EVERY = 12, 2
STEP_FILE = "save_checkpoint<fit<train write train/checkpoints/step-*.pt"
LATEST_RENAME = "write_atomic<save_checkpoint<fit replace train/checkpoints/latest.json"
QUICK = [KillPoint(STEP_FILE, 3, "torn"), KillPoint(LATEST_RENAME, 2, "before")]
DRAWN, SEED = 24, 16


def config(tiny_cache, name: str) -> dict:
    return tiny_train_config(tiny_cache, name, steps=STEPS, checkpoint_every=EVERY)


def command(raw: dict, *options: str) -> list[str]:
    path = Path(raw["workdir"]).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(raw))
    return python_command("-m", "litpipe.cli", "train", str(path), *options)


@pytest.fixture(scope="module")
def reference(tiny_cache):
    raw = config(tiny_cache, "kills-reference")
    train(validate_config(raw))
    return training_outcome(raw["workdir"])


@pytest.fixture(scope="module")
def drawn(tiny_cache, reference):
    raw = config(tiny_cache, "kills-traced")
    events = trace(command(raw), Path(raw["workdir"]), Path(raw["workdir"] + "-work"))
    return draw_points(events, DRAWN, SEED, {"save_checkpoint": 8, "latest.json": 4, "save_text_tower": 2})


def kill_and_resume(tiny_cache, reference, point: KillPoint, name: str) -> None:
    raw = config(tiny_cache, name)
    killed = run_killed(command(raw), Path(raw["workdir"]), point, Path(raw["workdir"] + "-work"))
    assert killed.hit is not None, f"the run ended before {point}: {killed.stderr[-2000:]}"
    kill_session(killed.hit["driver"])
    assert killed.returncode == -9
    checkpointed = (Path(raw["workdir"]) / "train" / "checkpoints" / "latest.json").exists()
    train(validate_config(raw), resume=checkpointed)
    got = training_outcome(raw["workdir"])
    assert got["steps"] == reference["steps"]  # every step once, the same numbers
    assert got["weights"].keys() == reference["weights"].keys()
    assert all(torch.equal(got["weights"][k], v) for k, v in reference["weights"].items())
    assert got["checkpoints"] == reference["checkpoints"] == ["latest.json", "step-00000010.pt", "step-00000012.pt"]
    assert got["summary"]
    record("train", f"SIGKILL {point}", "resumed from its checkpoint" if checkpointed else "no checkpoint yet: run again")


@pytest.mark.parametrize("index", range(len(QUICK)))
def test_a_kill_inside_a_checkpoint_write_resumes_to_the_same_run(tiny_cache, reference, index):
    kill_and_resume(tiny_cache, reference, QUICK[index], f"kills-quick-{index}")


@pytest.mark.faults
@pytest.mark.parametrize("index", range(DRAWN))
def test_a_kill_at_a_drawn_point_resumes_to_the_same_run(tiny_cache, reference, drawn, index):
    kill_and_resume(tiny_cache, reference, drawn[index], f"kills-drawn-{index}")
