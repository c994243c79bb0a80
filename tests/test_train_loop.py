"""The training loop end to end on a tiny real cache: cache == on-the-fly, export, the token cache.

Resume after kill -9, at many points, is tests/faults/test_train_kills.py."""

import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_train_config as config

from litpipe.store.parts import open_part
from litpipe.config import validate_config
from litpipe.scoring.search_index import build_index
from litpipe.models.text_tower import build_text_tower, load_text_tower
from litpipe.store import load_all, resolve_cache
from litpipe.train_text.export import export_model
from litpipe.train_text.trainer import build_run, fit, train

def losses(workdir) -> dict:
    """The last loss logged for each step (a resumed run re-logs the steps after its checkpoint)."""
    lines = (Path(workdir) / "train" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_training_from_the_cache_equals_on_the_fly_locked_image_training(tiny_cache, loss):
    cached = train(validate_config(config(tiny_cache, f"cached-{loss}", loss=loss)))
    encoder, images = tiny_cache["encoder"], tiny_cache["images"]
    fly_cfg = validate_config(config(tiny_cache, f"fly-{loss}", loss=loss))
    run = build_run(fly_cfg)
    run.image_features = lambda batch: encoder.encode(torch.stack([images[k] for k in batch.keys]))
    on_the_fly = fit(fly_cfg, run)
    expected, got = losses(cached.artifact.rsplit("/train", 1)[0]), losses(on_the_fly.artifact.rsplit("/train", 1)[0])
    assert list(got) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-5)


def test_export_loads_in_open_clip_with_the_trained_text_and_cached_image_features(tiny_cache, tmp_path):
    raw = config(tiny_cache, "exported", steps=2)
    cfg = validate_config(raw)
    summary = train(cfg)
    folder = export_model(cfg, str(tmp_path / "export"))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    tower, our_tokenizer, _ = load_text_tower(summary.artifact)
    texts = ["a red cat", "smiling face", "blue rocket moon"]
    assert torch.equal(tokenizer(texts), our_tokenizer(texts))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokenizer(texts), normalize=True), tower(our_tokenizer(texts)))
        contents = load_all(resolve_cache(cfg, "train"))
        images = torch.stack([tiny_cache["images"][k] for k in contents.keys[:8]])
        torch.testing.assert_close(model.encode_image(images), contents.embeddings[:8], rtol=1e-5, atol=1e-5)
    assert model.logit_scale.item() == pytest.approx(tower.logit_scale.item())
    with torch.no_grad():  # the export ranks images for a query as litpipe's eval search does
        all_images = torch.stack([tiny_cache["images"][k] for k in contents.keys])
        open_clip_scores = model.encode_text(tokenizer(texts), normalize=True) @ model.encode_image(all_images, normalize=True).T
    _, eval_ranking = build_index(F.normalize(contents.embeddings, dim=-1)).search(tower(our_tokenizer(texts)), 10)
    assert torch.equal(eval_ranking, open_clip_scores.topk(10, dim=1).indices)
    from_export, _, _ = load_text_tower(str(folder))  # eval and serve read an export folder too
    with torch.no_grad():
        torch.testing.assert_close(from_export(our_tokenizer(texts)), tower(our_tokenizer(texts)))
    assert from_export.logit_scale.item() == pytest.approx(tower.logit_scale.item())
    continued = build_text_tower(cfg.train.tower.model_copy(update={"init": f"local-dir:{folder}"}), tower.embed_dim)
    for name, value in tower.text.state_dict().items():  # LiT's "U": a model's text tower starts training
        torch.testing.assert_close(continued.text.state_dict()[name], value, msg=name)


def test_cli_fits_a_tokenizer_on_the_cache_captions_and_documents_every_command(tiny_cache, tmp_path, capsys):
    from litpipe.cli import main
    from litpipe.models.tokenizer import Tokenizer

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config(tiny_cache, "cli")))
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(path), "--vocab-size", "600", "--out", str(out)]) == 0
    tokenizer = Tokenizer.load(str(out), 16)
    assert tokenizer.vocab_size <= 600 and tokenizer.decode(tokenizer(["red cat"])[0].tolist()).strip() == "red cat"
    unigram = tmp_path / "unigram.json"
    assert main(["tokenizer", "train", str(path), "--model", "unigram", "--vocab-size", "60", "--out", str(unigram)]) == 0
    tokenizer = Tokenizer.load(str(unigram), 16)
    assert tokenizer.framing == "native" and tokenizer.decode(tokenizer(["red cat"])[0].tolist()) == "red cat"
    capsys.readouterr()
    for command, options in ((["train"], ["--resume", "--set"]), (["export"], ["--out", "--checkpoint"]),
                             (["tokenizer", "train"], ["--model", "--vocab-size", "--out", "--dataset"])):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        listed = [line.split()[0].rstrip(",") for line in capsys.readouterr().out.splitlines() if line.startswith("  -")]
        assert set(options) <= set(listed), (command, listed)


def test_checkpoints_on_s3_restore_weights_optimiser_and_schedule(tiny_cache, s3_root):
    from litpipe.train_text.trainer import build_run, load_checkpoint

    cfg = validate_config(config(tiny_cache, "s3-checkpoints", steps=2, checkpoint_dir=f"{s3_root}/checkpoints"))
    summary = train(cfg)
    run = build_run(cfg)
    assert load_checkpoint(cfg.train.checkpoint_dir, run) == 2
    final, _, _ = load_text_tower(summary.artifact)
    for name, value in final.state_dict().items():
        torch.testing.assert_close(run.tower.state_dict()[name], value, msg=name)
    assert run.scheduler.last_epoch == 2 and run.optimizer.state_dict()["state"]


def test_training_on_the_token_cache_equals_tokenising_every_step(tiny_cache):
    cached = train(validate_config(config(tiny_cache, "tokens-cached", steps=6)))
    on_the_fly = train(validate_config(config(tiny_cache, "tokens-fly", steps=6, pretokenize=False)))
    assert cached.final_loss == on_the_fly.final_loss
    assert losses(cached.artifact.rsplit("/train", 1)[0]) == losses(on_the_fly.artifact.rsplit("/train", 1)[0])


def test_the_token_cache_holds_every_caption_tokenised_once_per_tokenizer(tiny_cache):
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.store.tokens import TokenCache
    from litpipe.train_text.token_cache import ensure_token_cache

    cache = resolve_cache(validate_config(config(tiny_cache, "tokens")), "train")
    tokenizer = clip_tokenizer(16)
    tokens = ensure_token_cache(cache, tokenizer)
    assert tokens.complete and tokens.missing() == []
    for record in cache.parts():
        captions = open_part(cache, record).read(columns=["captions"]).column("captions").to_pylist()
        parquet, row = tokens.open_file(record), 0
        for group, rows in enumerate(record["row_groups"]):
            ids, offsets = tokens.rows(parquet, group)
            for r in range(rows):
                want = tokenizer(captions[row + r]).numpy()
                np.testing.assert_array_equal(ids[offsets[r]:offsets[r + 1]], want)
            row += rows
    assert TokenCache(cache, clip_tokenizer(12).fingerprint()).id != tokens.id  # another context: another cache
    assert ensure_token_cache(cache, tokenizer).id == tokens.id  # found again, nothing rebuilt


def test_throughput_counts_the_time_spent_waiting_for_data(tiny_cache, monkeypatch):
    """A data-bound run must show as one: samples/s over the whole step, data_wait its share."""
    import litpipe.train_text.trainer as trainer

    class SlowReader(trainer.StreamingReader):
        def _batch(self, start, step):
            time.sleep(1.0)
            return super()._batch(start, step)

    monkeypatch.setattr(trainer, "StreamingReader", SlowReader)
    summary = train(validate_config(config(tiny_cache, "slow-data", steps=6, prefetch_batches=1)))
    records = [json.loads(line) for line in (Path(summary.artifact).parent / "metrics.jsonl").read_text().splitlines()]
    steady = records[3:]  # once the prefetch buffers have drained, steps wait for their batch
    # medians: a step slowed by another process lets the next batch arrive early, but not every step's
    assert np.median([r["data_wait"] for r in steady]) > 0.5  # the tower's own step takes ~0.2 s here
    assert np.median([r["samples_per_s"] for r in steady]) < 16 / 0.9  # a batch of 16 per second of reading


def test_a_token_cache_built_before_more_shards_were_committed_is_completed(tiny_cache, tmp_path):
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.store.caption_rows import file_name
    from litpipe.store.tokens import TokenCache
    from litpipe.train_text.token_cache import ensure_token_cache

    cache = resolve_cache(validate_config(config(tiny_cache, "tokens-grow")), "train")
    tokens = ensure_token_cache(cache, clip_tokenizer(16))
    first = cache.parts()[0]
    Path(tokens.path, file_name(first)).unlink()  # as if this shard file came after the build
    assert tokens.complete and [r["name"] for r in tokens.missing()] == [first["name"]]
    assert ensure_token_cache(cache, clip_tokenizer(16)).missing() == []
    assert TokenCache(cache, clip_tokenizer(16).fingerprint()).open_file(first) is not None


def test_a_checkpoint_loads_with_weights_only_and_restores_every_random_generator(tiny_cache, tmp_path):
    """Checkpoints hold tensors only (torch.load(weights_only=True) refuses anything else): the RNG states of
    torch, numpy and Python go in as tensors and come back to draw the same numbers."""
    import io
    import random

    from litpipe.train_text.trainer import build_run, load_checkpoint, save_checkpoint

    run = build_run(validate_config(config(tiny_cache, "weights-only", steps=1)))
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    random.gauss(0, 1), np.random.standard_normal()  # both keep a cached Gaussian: it must travel too
    path = save_checkpoint(str(tmp_path / "checkpoints"), run, 7)
    expected = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)])
    torch.load(io.BytesIO(Path(path).read_bytes()), weights_only=True)  # raises on any non-tensor object
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    assert load_checkpoint(str(tmp_path / "checkpoints"), run) == 7
    got = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1) for _ in range(3)])
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_a_checkpoint_holding_python_objects_is_refused_with_the_fix(tiny_cache, tmp_path):
    import io

    from litpipe.errors import UserError
    from litpipe.train_text.trainer import build_run, load_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    buffer = io.BytesIO()
    torch.save({"step": 1, "rng": {"numpy": np.random.get_state()}}, buffer)  # as litpipe before 2026-12 wrote them
    (folder / "step-00000001.pt").write_bytes(buffer.getvalue())
    (folder / "latest.json").write_text(json.dumps({"step": 1, "file": "step-00000001.pt"}))
    run = build_run(validate_config(config(tiny_cache, "old-checkpoint", steps=1)))
    with pytest.raises(UserError, match="holds more than tensors.*resume it with the litpipe that wrote it"):
        load_checkpoint(str(folder), run)


def test_a_non_finite_loss_stops_the_run_before_its_update_leaving_the_last_checkpoint(tiny_cache):
    from litpipe.train_text.trainer import NonFiniteStep, build_run, fit

    def poisoned_at(step: int):
        calls = []

        def image_features(batch):
            calls.append(1)
            return batch.embeddings * (float("nan") if len(calls) == step else 1.0)
        return image_features

    cfg = validate_config(config(tiny_cache, "nan-stop", steps=5, checkpoint_every=2))
    run = build_run(cfg)
    run.image_features = poisoned_at(3)
    with pytest.raises(NonFiniteStep, match=r"step 3 gave loss nan.*latest\.json still names the last good checkpoint \(step 2\)"):
        fit(cfg, run)
    folder = Path(cfg.train_dir)
    assert json.loads((folder / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (folder / "final").exists()  # no tower trained on NaN is exported
    assert all(torch.isfinite(p).all() for p in run.tower.parameters())  # the update was never applied

    skipping = validate_config(config(tiny_cache, "nan-skip", steps=5, nonfinite_skips=1))
    run = build_run(skipping)
    run.image_features = poisoned_at(3)
    summary = fit(skipping, run)
    records = [json.loads(line) for line in (Path(skipping.train_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records if "loss" in r] == [0, 0, 1, 1, 1] and math.isfinite(summary.final_loss)
    assert all(torch.isfinite(p).all() for p in run.tower.parameters())


def test_the_training_step_alone_gives_the_reference_loss_and_grad_cache_the_gradients_of_one_backward(tiny_cache):
    """`train_step`, called without `fit`: its loss is the naive float64 CLIP loss of the batch; GradCache and one
    full backward leave the same (clipped) gradients; a NaN batch changes no weight and moves the schedule on."""
    from litpipe.train_text.trainer import embedder, text_batches, train_step

    cfg = validate_config(config(tiny_cache, "step-alone", steps=3, chunk_size=5))
    grads = {}
    for grad_cache in (True, False):
        t = cfg.train.model_copy(update={"grad_cache": grad_cache})
        run = build_run(cfg)
        inputs, owner, batch = next(text_batches(run, cfg, 0))
        assert inputs.dtype == torch.int32 and owner is None  # ids as the token cache holds them
        with torch.no_grad():
            text = F.normalize(run.tower(inputs).double(), dim=-1)
            logits = run.tower.logit_scale.exp().double() * text @ F.normalize(batch.embeddings.double(), dim=-1).T
            labels = torch.arange(len(logits))
            expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        loss, grad_norm = train_step(run, t, embedder(run, t), inputs, run.images(batch), owner)
        assert math.isclose(loss, expected.item(), rel_tol=1e-5) and grad_norm > 0
        grads[grad_cache] = {k: p.grad.clone() for k, p in run.tower.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 5
    for key, value in grads[True].items():
        torch.testing.assert_close(value, grads[False][key], rtol=1e-4, atol=1e-7, msg=key)

    before = {k: v.clone() for k, v in run.tower.state_dict().items()}
    loss, _ = train_step(run, cfg.train, embedder(run, cfg.train), inputs, batch.embeddings * float("nan"), owner)
    assert math.isnan(loss) and run.scheduler.last_epoch == 2
    assert all(torch.equal(v, before[k]) for k, v in run.tower.state_dict().items())


def test_a_resumed_run_logs_each_step_once_in_tensorboard_and_continues_its_wandb_run(tiny_cache):
    """A run cut back to its step-4 checkpoint (as a kill after step 6 leaves it) and resumed: TensorBoard's own
    EventAccumulator sees every step of every tag once, with the resumed values (the resumed writer's purge at
    step 5 drops the first writer's 5 and 6, evaluations included); W&B logs into the same run id."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = config(tiny_cache, "tensorboard-resume", steps=6, checkpoint_every=2, keep_checkpoints=3, log_every=1,
                 eval_every=2, wandb={"project": "litpipe-tests", "mode": "offline"})
    raw["eval"] = {"retrieval": ["train"]}
    cfg = validate_config(raw)
    train(cfg)
    folder = Path(cfg.train_dir)
    first_id = json.loads((folder / "checkpoints" / "wandb-run.json").read_text())["id"]
    (folder / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "file": "step-00000004.pt"}))
    resumed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 3e-3})})  # new values from step 5
    train(resumed, resume=True)

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    logged = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "train/lr")}
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr")):
        assert [s for s, _ in logged[tag]] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in logged[tag]] == pytest.approx([r[key] for r in records if key in r], rel=1e-6)
    eval_tag = next(tag for tag in events.Tags()["scalars"] if tag.startswith("eval/"))
    assert [e.step for e in events.Scalars(eval_tag)] == [2, 4, 6]
    assert json.loads((folder / "checkpoints" / "wandb-run.json").read_text())["id"] == first_id
    runs = sorted(p.name for p in (folder / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{first_id}" in name for name in runs)  # a second run in the same second: "-1" after it
