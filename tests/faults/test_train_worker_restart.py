"""Two Ray Train workers on a two-node local Ray cluster; one worker process is SIGKILLed mid-run.

Ray Train must restart the worker group by itself (train.max_failures) from the last checkpoint the
run reported, and the run must end as an uninterrupted one on the same cluster: bit-identical final
weights, and each step logged once (metrics.jsonl and TensorBoard) with the same numbers. The kill
comes from tests/faults/killhook in every process of the cluster: rank 0, right after it logs step
5 (checkpoints every 2 steps, so the restart continues from step 4 and logs 5 again). A NaN under
the same workers stops the run once, with the trainer's own message at the driver.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from checks import training_outcome
from harness import KillPoint, python_command, run_killed

pytestmark = pytest.mark.long
STEPS, EVERY = 8, 2
AFTER_STEP_5 = KillPoint("MetricsLog._write<MetricsLog.write<fit write train/metrics.jsonl", 5, "after", "process")

ON_TWO_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from litpipe.config import validate_config
from litpipe.errors import UserError
from litpipe.train_text.stage import run
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)  # one training worker a node
cluster.wait_for_nodes()
out = {}
for name, raw in json.loads(sys.argv[1]).items():
    raw["ray"] = {"address": cluster.address}
    try:
        out[name] = run(validate_config(raw)).resumed_at
    except UserError as err:
        out[name] = str(err)
out["nodes"] = len([n for n in ray.nodes() if n["Alive"]])
with open(sys.argv[2], "w") as f:
    f.write(json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


def test_a_killed_worker_is_restarted_from_the_checkpoint_and_the_run_ends_as_one_never_stopped(tiny_cache, tmp_path):
    runs = {name: tiny_train_config(tiny_cache, name, workers=2, steps=STEPS, checkpoint_every=EVERY)
            for name in ("restart-reference", "restart-killed")}
    runs["nan"] = tiny_train_config(tiny_cache, "restart-nan", workers=2, steps=STEPS, checkpoint_every=EVERY,
                                    lr=1e30, grad_clip=None)  # the weights blow up: step 2's loss is NaN
    results = tmp_path / "results.json"
    killed = run_killed(python_command("-c", ON_TWO_NODES, json.dumps(runs), str(results)),
                        Path(runs["restart-killed"]["workdir"]), AFTER_STEP_5, tmp_path / "work", timeout=600)
    assert killed.returncode == 0, killed.stderr[-4000:]
    assert killed.hit is not None and killed.hit["pid"] != killed.hit["driver"]  # a worker died, not the driver
    result = json.loads(results.read_text())
    assert result["nodes"] == 2
    assert result["restart-reference"] == 0 and result["restart-killed"] == 4  # continued from step 4's checkpoint
    assert re.match(r"train: step \d+ gave loss nan .* stopped before applying it", result["nan"]), result["nan"]

    reference = training_outcome(runs["restart-reference"]["workdir"])
    got = training_outcome(runs["restart-killed"]["workdir"])
    assert [s for s, *_ in got["steps"]] == list(range(1, STEPS + 1))  # each step once
    assert got["steps"] == reference["steps"] and got["tensorboard"] == reference["tensorboard"]
    assert got["checkpoints"] == reference["checkpoints"] and got["summary"]
    assert got["weights"].keys() == reference["weights"].keys()
    assert all(torch.equal(got["weights"][k], v) for k, v in reference["weights"].items())
