"""The eval stage end to end on a real cache, against open_clip's own API on the source images."""

import base64
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_ARCHITECTURE
from PIL import Image

from litpipe.store.commits import commit_part, finalize
from litpipe.config import validate_config
from litpipe.store import EmbeddingCache
from litpipe.models.image_encoder import load_encoder
from litpipe.files import expand_urls
from litpipe.store.fingerprint import dataset_fingerprint
from litpipe.models.text_tower import build_text_tower, save_text_tower
from litpipe.models.tokenizer import clip_tokenizer

MODEL = "litpipe-eval-tiny"
CLASSNAMES = ["apple", "heart", "star", "cat", "tree", "moon"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}"]


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A webdataset tar, its cache (float32, so open_clip's path sees the same vectors), a saved
    random text tower, and one run of the eval stage over it."""
    root = tmp_path_factory.mktemp("eval_stage")
    rng = np.random.default_rng(0)
    samples = []
    with tarfile.open(root / "heldout-000000.tar", "w") as tar:
        for i in range(30):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
            label = i % len(CLASSNAMES)
            captions = [f"a {CLASSNAMES[label]} number {i}"] + ([f"another {CLASSNAMES[label]}, {i}"] if i % 3 == 0 else [])  # unique: no ties
            key = f"s{i:04d}"
            _add(tar, f"{key}.png", buf.getvalue())
            _add(tar, f"{key}.txt", "\n".join(captions).encode())
            _add(tar, f"{key}.cls", str(label).encode())
            samples.append({"key": key, "image": buf.getvalue(), "captions": captions, "label": label})
    raw = {
        "workdir": str(root / "run"),
        "data": {"heldout": {"format": "webdataset", "urls": str(root / "heldout-*.tar"), "classnames": CLASSNAMES}},
        "encoder": {"model": MODEL, "architecture": TINY_ARCHITECTURE, "device": "cpu"},
        "store": {"root": str(root / "store"), "embedding_dtype": "float32"},
        "train": {"dataset": "heldout", "tower": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}},
        "eval": {"retrieval": ["heldout"], "zeroshot": [{"dataset": "heldout", "templates": TEMPLATES}],
                 "ks": [1, 5, 10], "device": "cpu"},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(raw))
    cfg = validate_config(raw)
    encoder = load_encoder(cfg.encoder, "cpu")
    pixels = torch.stack([encoder.preprocess(Image.open(io.BytesIO(s["image"])).convert("RGB")) for s in samples])
    embeddings = encoder.encode(pixels).numpy()
    table = pa.table({
        "key": [s["key"] for s in samples],
        "captions": [s["captions"] for s in samples],
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), embeddings.shape[1]),
        "label": pa.array([s["label"] for s in samples], pa.int64()),
    })
    cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fingerprint(cfg.data["heldout"]),
                                          embedding_dtype="float32")
    commit_part(cache, expand_urls(cfg.data["heldout"].urls)[0], table)
    finalize(cache)
    torch.manual_seed(0)
    tower = build_text_tower(cfg.train.tower, embed_dim=embeddings.shape[1])
    save_text_tower(f"{cfg.workdir}/train/final", tower, clip_tokenizer(16))

    from litpipe.eval.stage import run

    summary = run(cfg)
    return {"root": root, "cfg": cfg, "samples": samples, "summary": summary, "cache": cache}


def _open_clip_reference(cfg, export_dir, samples):
    """CLIP_benchmark's recipe on the exported model, loaded and run by open_clip alone from the source images."""
    import open_clip

    from litpipe.train_text.export import export_model

    export_model(cfg, str(export_dir))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export_dir}")
    with torch.no_grad():
        images = F.normalize(model.encode_image(torch.stack(
            [preprocess(Image.open(io.BytesIO(s["image"])).convert("RGB")) for s in samples])), dim=-1).double()
        texts = [t for s in samples for t in s["captions"]]
        text_image = torch.tensor([i for i, s in enumerate(samples) for _ in s["captions"]])
        text_emb = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).double()
        classifier = []
        for name in CLASSNAMES:
            emb = F.normalize(model.encode_text(tokenizer([t.replace("{c}", name) for t in TEMPLATES])), dim=-1).mean(0)
            classifier.append(emb / emb.norm())
        classifier = torch.stack(classifier, dim=1).double()
    scores = text_emb @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(texts)), text_image] = True
    out = {}
    for k in (1, 5, 10):
        for name, s, p in (("image_retrieval_recall", scores, positive), ("text_retrieval_recall", scores.T, positive.T)):
            top = torch.topk(s, k, dim=1).indices
            hits = (F.one_hot(top, s.shape[1]) * p.view(len(s), 1, -1)).sum(dim=(1, 2)) > 0
            out[f"{name}@{k}"] = hits.double().mean().item()
    logits = 100.0 * images @ classifier
    target = torch.tensor([s["label"] for s in samples])
    pred = logits.topk(5, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    out["acc1"] = correct[:1].reshape(-1).double().sum().item() / len(target)
    out["acc5"] = correct[:5].reshape(-1).double().sum().item() / len(target)
    argmax = logits.argmax(1)
    out["mean_per_class_recall"] = np.mean([(argmax[target == c] == c).double().mean().item() for c in target.unique()])
    return out


def test_eval_from_the_cache_equals_open_clip_running_the_exported_model_on_the_source_images(evaluated):
    report = json.loads((evaluated["root"] / "run" / "eval" / "eval.json").read_text())
    reference = _open_clip_reference(evaluated["cfg"], evaluated["root"] / "export", evaluated["samples"])
    got = {**report["retrieval"]["heldout"]["metrics"], **report["zeroshot"]["heldout"]["metrics"]}
    assert got == pytest.approx(reference, abs=1e-9)


def test_eval_json_names_the_cache_and_checkpoint_and_the_table_shows_chance(evaluated):
    report = json.loads((evaluated["root"] / "run" / "eval" / "eval.json").read_text())
    assert report["checkpoint"].endswith("run/train/final")
    assert report["retrieval"]["heldout"]["cache_id"] == evaluated["cache"].id
    assert report["zeroshot"]["heldout"]["cache_id"] == evaluated["cache"].id
    assert report["zeroshot"]["heldout"]["chance"]["acc1"] == pytest.approx(1 / 6)
    assert report["retrieval"]["heldout"]["chance"]["image_retrieval_recall@5"] == pytest.approx(5 / 30)
    lines = evaluated["summary"].report
    assert lines[0] == "| dataset | task | metric | value | chance |"
    assert any("text→image R@5" in line and "16.67%" in line for line in lines)
    png = (evaluated["root"] / "run" / "eval" / "eval.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_search_prints_keys_and_writes_a_contact_sheet_with_the_source_images(evaluated, capsys):
    from litpipe.cli import main

    out = evaluated["root"] / "sheet.html"
    assert main(["search", "a star number 2", str(evaluated["root"] / "pipeline.yaml"), "--k", "4", "--html", str(out)]) == 0
    printed = capsys.readouterr().out
    keys = [line.split()[2] for line in printed.splitlines()[1:5]]
    assert len(keys) == 4 and all(k.startswith("s0") for k in keys)
    sheet = out.read_text()
    by_key = {s["key"]: s["image"] for s in evaluated["samples"]}
    for key in keys:
        assert base64.b64encode(by_key[key]).decode() in sheet


def test_eval_without_a_trained_tower_says_where_it_looked(evaluated):
    from litpipe.errors import UserError
    from litpipe.eval.stage import run

    with pytest.raises(UserError, match="not a text-tower or export folder"):
        run(evaluated["cfg"], checkpoint=str(evaluated["root"] / "nowhere"))
