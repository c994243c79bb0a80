"""Evaluation while training: the eval sets scored every train.eval_every steps (text side only), logged to
metrics.jsonl, TensorBoard and W&B, drawn as eval.png, the best tower kept; the losses do not change."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_config

from litpipe.config import ConfigError, validate_config
from litpipe.scoring.suite import EvalSuite, flat_metrics
from litpipe.models.text_tower import load_text_tower
from litpipe.train_text.trainer import train

METRIC = "retrieval/train/image_retrieval_recall@1"


def config(tiny_cache, name, **train):
    raw = tiny_train_config(tiny_cache, name, steps=6, **train)
    raw["eval"] = {"retrieval": ["train"], "ks": [1, 5]}
    return raw


def records(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "train" / "metrics.jsonl").read_text().splitlines()]


def test_eval_every_n_steps_logs_plots_and_keeps_the_best_tower_without_changing_the_losses(tiny_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain = config(tiny_cache, "no-eval")
    train(validate_config(plain))
    raw = config(tiny_cache, "eval-every-2", eval_every=4, keep_best=METRIC)
    summary = train(validate_config(raw))
    evals = [r for r in records(raw["workdir"]) if "eval" in r]
    assert [r["step"] for r in evals] == [4, 6]  # every 4 steps, and at the end
    assert set(evals[0]["eval"]) == {f"retrieval/train/{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5)}
    assert evals[0]["chance"][METRIC] == pytest.approx(1 / 96)
    losses = lambda workdir: [r["loss"] for r in records(workdir) if "loss" in r]  # noqa: E731
    assert losses(raw["workdir"]) == losses(plain["workdir"])

    cfg = validate_config(raw)  # the logged numbers are what the eval stage's suite gives for the final tower
    final, tokenizer, _ = load_text_tower(summary.artifact)
    with torch.no_grad():
        assert flat_metrics(EvalSuite(cfg).evaluate(final, tokenizer)) == pytest.approx(evals[-1]["eval"])
    best, _, meta = load_text_tower(summary.best)
    best_record = max(evals, key=lambda r: r["eval"][METRIC])  # the first of equal values is kept
    assert (meta["step"], meta["value"]) == (best_record["step"], best_record["eval"][METRIC])
    assert Path(summary.eval_curve).stat().st_size > 10_000

    events = EventAccumulator(str(Path(raw["workdir"]) / "train" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars(f"eval/{METRIC}")] == [4, 6]


def test_wandb_offline_receives_the_training_and_eval_numbers(tiny_cache, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    raw = config(tiny_cache, "wandb", eval_every=3, wandb={"project": "litpipe-test", "name": "tiny", "mode": "offline"})
    train(validate_config(raw))
    runs = sorted((Path(raw["workdir"]) / "train" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb (0.31) has no Python reader of its run files; history items are protobuf strings in them, each
    # a key and its value as JSON, which `wandb sync` uploads
    written = runs[0].read_bytes()
    logged = records(raw["workdir"])
    for record in logged:
        for key, value in (record["eval"] if "eval" in record else record).items():
            if key != "step":
                name = f"eval/{key}" if "eval" in record else f"train/{key}"
                assert name.encode() in written and json.dumps(value).encode() in written, (name, value)
    assert sum("eval" in r for r in logged) == 2


def test_keep_best_names_an_unknown_metric_with_the_known_ones(tiny_cache):
    with pytest.raises(ConfigError, match=r"train.keep_best: no metric `retrieval/train/recall@1`; did you mean "):
        validate_config(config(tiny_cache, "bad", eval_every=2, keep_best="retrieval/train/recall@1"))
    with pytest.raises(ConfigError, match="train.keep_best: needs train.eval_every > 0"):
        validate_config(config(tiny_cache, "bad", keep_best=METRIC))
