"""A cache is found by what it holds, never by how a config spells a path: the same weights and
shards named from another folder, another working directory or another config give one cache; a
stored dtype is part of the identity; a cache made before identity by content is adopted, not encoded."""

import shutil
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml

from conftest import TINY_ARCHITECTURE
from litpipe.store.maintenance import verify
from litpipe.config import load_config
from litpipe.precompute import stage
from litpipe.store.cache import CacheError, EmbeddingCache, list_caches, resolve_cache
from litpipe.store.fingerprint import dataset_fingerprint
from litpipe.train_text import stage as train_stage
from precompute_samples import cache_rows, image_bytes, sample_members, write_tar

LEGACY = Path(__file__).parent / "data" / "legacy-v2.tar.gz"
LEGACY_ROOT = Path("/tmp/litpipe-legacy-v2")  # where tests/data/make_legacy_v2.py wrote it: its input URLs are absolute


def write_project(root: Path) -> None:
    """A user's project: shards, an open_clip checkpoint, pipeline.yaml naming both relatively, and an
    experiment config in configs/ naming the same files from there."""
    (root / "data").mkdir()
    write_tar(root / "data" / "shard-0.tar", [m for i in range(6) for m in sample_members(f"k{i}", image_bytes(i), f"a {i}")])
    torch.manual_seed(0)
    torch.save({"state_dict": open_clip.CLIP(**TINY_ARCHITECTURE).state_dict()}, root / "tower.pt")
    config = {"workdir": "runs", "data": {"train": {"format": "webdataset", "urls": "data/shard-*.tar"}},
              "encoder": {"model": "litpipe-identity-tiny", "pretrained": "tower.pt", "architecture": TINY_ARCHITECTURE,
                          "precision": "fp32"},
              "store": {"root": "store"}, "precompute": {"batch_size": 8},
              "train": {"tower": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}, "batch_size": 4,
                        "chunk_size": 4, "steps": 2},
              "eval": {"retrieval": ["train"], "ks": [1, 5], "device": "cpu"}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    (root / "configs").mkdir()
    config.update(workdir="../runs/exp1", store={"root": "../store"})
    config["data"]["train"]["urls"] = "../data/shard-*.tar"
    config["encoder"]["pretrained"] = "../tower.pt"
    (root / "configs" / "exp1.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    write_project(root)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    return root, elsewhere


def test_the_same_weights_and_shards_named_three_ways_make_one_cache(ray_local, project, monkeypatch):
    root, elsewhere = project
    monkeypatch.chdir(root)
    first = stage.run(load_config("pipeline.yaml")).datasets["train"]
    assert first.embedded == 6
    monkeypatch.chdir(elsewhere)
    for config in (root / "pipeline.yaml", root / "configs" / "exp1.yaml"):
        again = stage.run(load_config(str(config))).datasets["train"]
        assert (again.cache_id, again.reused, again.embedded) == (first.cache_id, True, 0)
    assert [c.id for c in list_caches(str(root / "store"))] == [first.cache_id]
    # Nothing in the cache's identity spells a path: the checkpoint is named by its bytes.
    manifest = EmbeddingCache.open(first.cache_url).manifest
    assert manifest["encoder"]["pretrained"].startswith("sha256:") and "tower.pt" not in str(manifest["encoder"])


def test_train_eval_export_and_search_run_from_another_directory_and_a_moved_export_loads(
        ray_local, project, monkeypatch, capsys):
    from litpipe.cli import main
    from litpipe.eval.stage import run as evaluate
    from litpipe.models.text_tower import load_text_tower
    from litpipe.train_text.export import export_model

    root, elsewhere = project
    monkeypatch.chdir(root)
    stage.run(load_config("pipeline.yaml"))
    monkeypatch.chdir(elsewhere)
    config = str(root / "configs" / "exp1.yaml")
    assert train_stage.run(load_config(config)).steps == 2
    assert (root / "runs" / "exp1" / "train" / "final").is_dir() and not (elsewhere / "runs").exists()
    assert evaluate(load_config(config)).eval_json == str(root / "runs" / "exp1" / "eval" / "eval.json")
    assert main(["search", "a 3", config, "--k", "2"]) == 0
    printed = capsys.readouterr().out
    assert sum(f" k{i} " in printed for i in range(6)) == 2, printed  # two keys of the cache, found by search
    export = export_model(load_config(config), "export")
    moved = shutil.move(export, root / "moved-export")  # an open_clip folder with CLIP's BPE loads wherever it is
    tower, tokenize, _ = load_text_tower(str(root / "runs" / "exp1" / "train" / "final"))
    model = open_clip.create_model_and_transforms(f"local-dir:{moved}")[0].eval()
    texts = ["a 1", "a photo of a 5"]
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.normalize(model.encode_text(
            open_clip.get_tokenizer(f"local-dir:{moved}")(texts)), dim=-1), tower(tokenize(texts)), atol=1e-5, rtol=1e-5)


def test_a_float32_request_does_not_reuse_a_float16_cache(project, monkeypatch):
    root, _ = project
    monkeypatch.chdir(root)
    half = load_config("pipeline.yaml", ["store.root=dtype-store"])
    single = load_config("pipeline.yaml", ["store.root=dtype-store", "store.embedding_dtype=float32"])
    encoder = {"model": "m", "weights_sha256": "0" * 64, "dim": 4, "spec": half.encoder.spec()}
    dataset = dataset_fingerprint(half.data["train"])
    made = EmbeddingCache.open_or_create(half.store.root, encoder, dataset, "float16")
    assert EmbeddingCache.find(half.store.root, encoder, dataset, "float32") is None
    other = EmbeddingCache.open_or_create(half.store.root, encoder, dataset, "float32")
    assert other.id != made.id and other.embedding_dtype == "float32" and made.embedding_dtype == "float16"
    assert resolve_cache(half, "train").id == made.id and resolve_cache(single, "train").id == other.id
    with pytest.raises(CacheError, match="no float32 cache of dataset `train`"):
        resolve_cache(load_config("pipeline.yaml", ["store.root=dtype-store-2", "store.embedding_dtype=float32"]), "train")


def test_a_cache_made_before_identity_by_content_is_adopted_without_encoding(ray_local, tmp_path, monkeypatch):
    shutil.rmtree(LEGACY_ROOT, ignore_errors=True)
    with tarfile.open(LEGACY) as tar:
        tar.extractall(LEGACY_ROOT, filter="tar")
    try:
        store = str(LEGACY_ROOT / "store")
        (old,) = list_caches(store)
        assert old.manifest["format_version"] == 2 and old.manifest["encoder"]["pretrained"] == "tower.pt"
        before = cache_rows(old)
        experiment = LEGACY_ROOT / "experiments" / "a.yaml"  # the same files, named from another folder
        experiment.parent.mkdir()
        raw = yaml.safe_load((LEGACY_ROOT / "pipeline.yaml").read_text())
        raw.update(workdir="../runs", store={"root": "../store", "embedding_dtype": "float32"})
        raw["data"]["train"]["urls"] = "../data/shard-*.tar"
        raw["encoder"]["pretrained"] = "../tower.pt"
        experiment.write_text(yaml.safe_dump(raw))
        cfg = load_config(str(experiment))
        with pytest.raises(CacheError, match="made by an earlier litpipe: `litpipe precompute` adopts"):
            resolve_cache(cfg, "train")
        monkeypatch.chdir(tmp_path)
        result = stage.run(cfg).datasets["train"]
        assert (result.reused, result.embedded, result.reused_from) == (True, 0, [old.id])
        (new,) = list_caches(store)
        assert new.id != old.id and new.manifest["format_version"] == 3 and new.complete
        after = cache_rows(new)
        assert after.keys() == before.keys()
        for key in before:
            np.testing.assert_array_equal(after[key]["embedding"], before[key]["embedding"])
        assert (Path(new.path) / "tokens").is_dir() and not (Path(old.path) / "manifest.json").exists()
        assert verify(new) == []
        assert resolve_cache(cfg, "train").id == new.id
        assert train_stage.run(cfg).steps == 2
    finally:
        shutil.rmtree(LEGACY_ROOT, ignore_errors=True)
