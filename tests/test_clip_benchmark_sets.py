"""Eval sets as the field ships them: a classification and a retrieval set written by CLIP_benchmark's own
webdataset converter (an image and a .cls label with no caption; several captions per image), read by
`format: clip_benchmark` with their class names and templates, and scored by litpipe to CLIP_benchmark's
own numbers for the same exported model on the same tars."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_ARCHITECTURE
from litpipe.config import validate_config
from litpipe.store.cache import EmbeddingCache

clip_benchmark = pytest.importorskip("clip_benchmark")

CLASSES = ["apple", "heart", "star", "cat", "tree", "moon"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]


class Classification(list):
    """(image bytes, label) pairs with the attributes CLIP_benchmark's converter reads."""
    classes, templates = CLASSES, TEMPLATES


def png(rng) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def benchmark(ray_local, tmp_path_factory):
    """Both sets converted by CLIP_benchmark, precomputed by litpipe, a random text tower exported as an
    open_clip model, and litpipe's eval of that export."""
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset

    from litpipe.eval.stage import run as evaluate
    from litpipe.models.text_tower import build_text_tower, save_text_tower
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.precompute import stage as precompute
    from litpipe.train_text.export import export_model

    root = tmp_path_factory.mktemp("clip_benchmark")
    rng = np.random.default_rng(0)
    convert_dataset(Classification((png(rng), i % len(CLASSES)) for i in range(30)), "test", str(root / "wds_cls"),
                    image_format="png", max_count=12, verbose=False)
    captions = [[f"a {CLASSES[i % 6]} number {i}"] + [f"another {CLASSES[i % 6]} {i}, {j}" for j in range(i % 3)]
                for i in range(20)]
    convert_retrieval_dataset([(png(rng), c) for c in captions], "test", str(root / "wds_ret"), image_format="png",
                              max_count=8, verbose=False)
    raw = {
        "workdir": str(root / "run"),
        "data": {"cls": {"format": "clip_benchmark", "urls": str(root / "wds_cls" / "test")},
                 "ret": {"format": "clip_benchmark", "urls": str(root / "wds_ret" / "test")}},
        "encoder": {"model": "litpipe-cb-tiny", "architecture": TINY_ARCHITECTURE, "preprocess": "pil", "precision": "fp32"},
        "store": {"root": str(root / "store"), "embedding_dtype": "float32"},
        "train": {"dataset": "ret", "tower": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}},
        "eval": {"retrieval": ["ret"], "zeroshot": [{"dataset": "cls"}], "ks": [1, 5], "device": "cpu"},
    }
    cfg = validate_config(raw)
    summary = precompute.run(cfg)
    torch.manual_seed(0)
    save_text_tower(cfg.final_text_tower, build_text_tower(cfg.train.tower, embed_dim=32), clip_tokenizer(16))
    export = export_model(cfg, str(root / "export"))
    evaluate(cfg, checkpoint=str(export))
    return {"root": root, "cfg": cfg, "precompute": summary, "export": export, "captions": captions,
            "report": json.loads((root / "run" / "eval" / "eval.json").read_text())}


def test_a_classification_set_without_captions_is_cached_with_its_labels(benchmark):
    cls = benchmark["precompute"].datasets["cls"]
    assert (cls.embedded, cls.skipped, cls.uncaptioned) == (30, 0, 30)
    assert "30 image(s) without a caption" in " ".join(benchmark["precompute"].report)
    zeroshot = benchmark["report"]["zeroshot"]["cls"]
    assert zeroshot["num_classes"] == 6 and zeroshot["templates"].endswith("wds_cls/zeroshot_classification_templates.txt")


def test_a_retrieval_set_keeps_every_caption_of_each_image(benchmark):
    cache = EmbeddingCache.open(benchmark["precompute"].datasets["ret"].cache_url)
    from litpipe.store import load_all

    contents = load_all(cache)
    assert sorted(map(tuple, contents.captions)) == sorted(map(tuple, benchmark["captions"]))


def numpy2_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` with `.item()` where it calls float() on a 1-element array, which
    NumPy 2 refuses; the formula is its own."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_litpipes_eval_equals_clip_benchmarks_own_on_the_same_export_and_tars(benchmark, monkeypatch):
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    monkeypatch.setattr(zeroshot_classification, "accuracy", numpy2_accuracy)
    export, root = benchmark["export"], benchmark["root"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    cls = build_dataset("wds/cls", root=str(root / "wds_cls"), split="test", transform=preprocess)
    ret = build_dataset("wds/ret", root=str(root / "wds_ret"), split="test", transform=preprocess,
                        task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(cls, batch_size=8)
    reference = zeroshot_classification.evaluate(model, loader, tokenizer, cls.classes, cls.templates, "cpu", amp=False)
    loader = torch.utils.data.DataLoader(ret, batch_size=8, collate_fn=get_dataset_collate_fn("mscoco_captions"))
    reference.update(zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5]))
    report = benchmark["report"]
    got = {**report["zeroshot"]["cls"]["metrics"], **report["retrieval"]["ret"]["metrics"]}
    assert set(reference) <= set(got)
    for name, value in reference.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
