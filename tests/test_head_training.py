"""Both sides cached: a frozen text model's features computed once per caption (a real Ray Data job), heads
trained on the two caches, checked against the text model run by the test and against the same heads trained
with the frozen model run live every step."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_config

from litpipe.store.parts import open_part
from litpipe.config import TextModelConfig, validate_config
from litpipe.models.text_model import FrozenTextModel
from litpipe.store import load_all, resolve_cache

transformers = pytest.importorskip("transformers")
TEXTS = ["red cat", "a blue dog smiling under the moon", "", "star heart flag tree rocket face"]


def own_output(folder: str, texts: list[str], pooling: str) -> torch.Tensor:
    """transformers' own tokenizer and forward, pooled here: the reference."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    model = model.get_encoder() if model.config.is_encoder_decoder else model
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    out = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding in the reference
            ids = tokenizer([text], return_tensors="pt")["input_ids"]
            states = model(input_ids=ids).last_hidden_state[0]
            if pooling == "eos":
                out.append(states[(ids[0] == end).nonzero()[0, 0]])
            else:
                out.append({"cls": states[0], "mean": states.mean(0), "last": states[-1]}[pooling])
    return torch.stack(out)


@pytest.mark.parametrize("model, pooling", [("bert", "cls"), ("bert", "mean"), ("bert", "eos"), ("gpt", "last"),
                                            ("gpt", "mean"), ("t5", "eos"), ("t5", "mean")])
def test_the_frozen_text_model_pools_as_its_own_output_does(text_models, model, pooling):
    frozen = FrozenTextModel(TextModelConfig(model=text_models[model], pooling=pooling, dtype="float32"))
    texts = TEXTS if model != "gpt" else [t for t in TEXTS if t]  # GPT-2 gives an empty text no token
    torch.testing.assert_close(frozen.encode(texts), own_output(text_models[model], texts, pooling), atol=1e-5, rtol=1e-5)


def test_eos_pooling_on_a_tokenizer_that_adds_no_end_token_names_the_fix(text_models):
    frozen = FrozenTextModel(TextModelConfig(model=text_models["gpt"], pooling="eos"))
    with pytest.raises(Exception, match="no end token within max_length.*use last or mean"):
        frozen.encode(["red cat"])


def test_the_text_feature_cache_holds_the_models_feature_of_every_caption(ray_local, tiny_cache, text_models):
    from litpipe.train_text.text_feature_job import ensure_text_features

    cfg = validate_config(head_config(tiny_cache, "text-features", text_models))
    cache = resolve_cache(cfg, "train")
    features = ensure_text_features(cfg, cache)
    assert features.complete and features.missing() == []
    contents = load_all(cache)
    got = {}
    for record in cache.parts():
        parquet = features.open_file(record)
        keys = open_part(cache, record).read(columns=["key"]).column("key").to_pylist()
        row = 0
        for group in range(len(record["row_groups"])):
            values, offsets = features.rows(parquet, group)
            for r in range(len(offsets) - 1):
                got[keys[row + r]] = values[offsets[r]:offsets[r + 1]]
            row += len(offsets) - 1
    for key, captions in zip(contents.keys, contents.captions):
        expected = own_output(text_models["bert"], captions, "mean")
        np.testing.assert_allclose(got[key], expected.numpy(), atol=1e-5, rtol=1e-5)
    assert ensure_text_features(cfg, cache).id == features.id  # found again, nothing rebuilt
    raw = head_config(tiny_cache, "text-features", text_models)
    raw["train"]["text_model"]["pooling"] = "cls"
    assert ensure_text_features(validate_config(raw), cache).id != features.id  # another pooling: another cache


def losses(workdir: str) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (Path(workdir) / "train" / "metrics.jsonl").open())
            if "loss" in r]


@pytest.mark.parametrize("positives", ["sampled", "all"])
def test_heads_on_both_caches_train_as_with_the_frozen_text_model_run_live(ray_local, tiny_cache, text_models, positives):
    from litpipe.train_text.trainer import build_run, fit, train

    cached_raw = head_config(tiny_cache, f"heads-cached-{positives}", text_models, positives=positives)
    cached = train(validate_config(cached_raw))
    live_cfg = validate_config(head_config(tiny_cache, f"heads-live-{positives}", text_models, positives=positives))
    run = build_run(live_cfg)
    run.per_caption = None  # the text model runs on every step's captions instead
    run.encode_captions = FrozenTextModel(live_cfg.train.text_model).encode
    live = fit(live_cfg, run)
    got, want = losses(cached_raw["workdir"]), losses(live_cfg.workdir)
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4, 5]
    assert np.abs(np.array(got)[:, 1] - np.array(want)[:, 1]).max() < 1e-6
    assert abs(cached.final_loss - live.final_loss) < 1e-6


def test_heads_are_evaluated_and_served_through_the_frozen_text_model(ray_local, tiny_cache, text_models):
    from litpipe.eval.stage import evaluate
    from litpipe.models.text_tower import load_text_tower
    from litpipe.train_text.trainer import train

    raw = head_config(tiny_cache, "heads-eval", text_models, eval_every=5)
    raw["eval"] = {"retrieval": ["train"]}
    summary = train(validate_config(raw))
    tower, tokenizer, meta = load_text_tower(summary.artifact)
    features = tower(tokenizer(["red cat", "a blue dog"]))
    assert features.shape == (2, 20) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    assert tower.project_images(torch.zeros(3, 32)).shape == (3, 20)
    results = evaluate(validate_config(raw))
    during = [json.loads(line) for line in (Path(raw["workdir"]) / "train" / "metrics.jsonl").open()]
    last = [r["eval"] for r in during if "eval" in r][-1]
    assert results["retrieval"]["train"]["metrics"]["image_retrieval_recall@5"] == last["retrieval/train/image_retrieval_recall@5"]


@pytest.mark.long
def test_heads_open_clip_can_hold_export_as_an_open_clip_model_with_the_same_text_features(ray_local, tiny_cache,
                                                                                          text_models, tmp_path):
    import open_clip

    from litpipe.models.text_tower import load_text_tower
    from litpipe.train_text.export import export_model
    from litpipe.train_text.trainer import train

    raw = head_config(tiny_cache, "heads-open-clip", text_models)
    raw["train"]["heads"] = {"text": {"kind": "linear", "bias": False}, "image": {"kind": "none"}}
    raw["train"]["text_model"]["pooling"] = "cls"
    summary = train(validate_config(raw))
    folder = export_model(validate_config(raw), str(tmp_path / "export"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    texts = ["red cat", "a blue dog smiling under the moon", "star heart"]
    tower, tokenize, _ = load_text_tower(summary.artifact)
    with torch.no_grad():
        got = torch.nn.functional.normalize(model.eval().encode_text(tokenizer(texts)), dim=-1)
        torch.testing.assert_close(got, tower(tokenize(texts)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.logit_scale.detach(), tower.logit_scale.detach())


def test_heads_open_clip_cannot_hold_export_with_the_image_tower_named_and_load_with_the_readme_snippet(
        ray_local, tiny_cache, text_models, tmp_path, monkeypatch):
    from test_image_towers import readme_snippet

    from litpipe.models.text_tower import load_text_tower
    from litpipe.train_text.export import export_model
    from litpipe.train_text.trainer import train

    model = shutil.copytree(text_models["bert"], tmp_path / "my-bert")  # a user's model folder, gone after the export
    raw = head_config(tiny_cache, "heads-export", {**text_models, "bert": str(model)})  # an MLP text head with biases,
    summary = train(validate_config(raw))                                               # a linear image head
    exported = export_model(validate_config(raw), str(tmp_path / "export"))
    tower, tokenize, _ = load_text_tower(summary.artifact)
    shutil.rmtree(model)
    (tmp_path / "moved").mkdir()
    folder = shutil.move(exported, tmp_path / "moved" / "export")  # and the export moved: it holds the model it needs
    monkeypatch.chdir(tmp_path / "moved")
    folder = Path(folder)
    manifest = json.loads((folder / "image_tower.json").read_text())
    assert manifest["library"] == "open_clip" and "an image head" in manifest["not_open_clip"]
    assert not (folder / "open_clip_config.json").exists()
    cache = resolve_cache(validate_config(raw), "train")
    code = readme_snippet("heads-export").replace('folder = "runs/export"', f'folder = "{folder}"')
    names: dict = {}
    exec(compile(code.replace("litpipe-store/CACHE_ID", cache.url), "README.md:heads-export", "exec"), names)
    with torch.no_grad():
        torch.testing.assert_close(names["texts"], tower(tokenize(["a photo of a cat", "a photo of a dog"])))
        expected = torch.nn.functional.normalize(tower.project_images(load_all(cache).embeddings), dim=-1)
    torch.testing.assert_close(names["images"], expected)
    assert names["probabilities"].shape == (len(expected), 2)


@pytest.mark.long
def test_heads_train_on_two_ray_train_workers_from_the_feature_cache_the_driver_built(ray_local, tiny_cache, text_models):
    from litpipe.models.text_tower import load_text_tower
    from litpipe.train_text.stage import run

    raw = head_config(tiny_cache, "heads-two-workers", text_models, workers=2, steps=2, loss="sigmoid", positives="all")
    summary = run(validate_config(raw))
    assert summary.world_size == 2 and summary.steps == 2 and np.isfinite(summary.final_loss)
    tower, tokenize, meta = load_text_tower(summary.artifact)
    assert meta["loss"] == "sigmoid" and tower(tokenize(["red cat"])).shape == (1, 20)
