"""Image towers users bring: a timm ViT and Hugging Face DINOv2 (tiny, random, saved here as a user's checkpoint and
model folder are), precomputed through the real Ray job and checked against each library's own transform + forward."""

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from precompute_samples import sample_members, write_tar
from test_pixels import photo

from litpipe.config import EncoderConfig, validate_config
from litpipe.images import decode_image
from litpipe.models.image_encoder import load_encoder
from litpipe.models.image_towers import EncoderError
from litpipe.precompute import stage
from litpipe.store import load_all, resolve_cache

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZES = [(97, 75), (75, 97), (64, 64), (160, 120), (201, 133), (99, 75)]  # (99, 75): a 39 px crop margin,
# where torchvision rounds the offset to even (20) and transformers rounds it down (19)


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A timm `test_vit` checkpoint (with a classifier, as checkpoints ship) and DINOv2 folders with and without
    registers (model + BitImageProcessor: shortest edge 72, centre crop 56, bicubic, ImageNet mean/std)."""
    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(7)
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), root / "test_vit.pth")
    processor = transformers.BitImageProcessor(size={"shortest_edge": 72}, crop_size={"height": 56, "width": 56},
                                               do_center_crop=True, resample=3, do_convert_rgb=True,
                                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    folders = {}
    for name, cls, extra in (("dinov2", transformers.Dinov2Config, {}),
                             ("dinov2-reg", transformers.Dinov2WithRegistersConfig, {"num_register_tokens": 4})):
        config = cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=56,
                     patch_size=14, **extra)
        model = transformers.AutoModel.from_config(config)
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        folders[name] = str(root / name)
    images = [photo(i, size) for i, size in enumerate(SIZES)]
    data = root / "data"
    data.mkdir()
    write_tar(data / "train-0.tar", [m for i, image in enumerate(images)
                                    for m in sample_members(f"k{i}", jpeg(image), f"photo {i}", ext="jpg")])
    decoded = [Image.open(io.BytesIO(jpeg(image))).convert("RGB") for image in images]
    return {"timm": str(root / "test_vit.pth"), **folders, "data": str(data), "root": root, "images": decoded}


def precompute(towers, name: str, encoder: dict) -> tuple[torch.Tensor, object]:
    """The real Ray job into a float32 store; the cached vectors in key order, and the config."""
    cfg = validate_config({"data": {"train": {"format": "webdataset", "urls": f"{towers['data']}/train-*.tar"}},
                           "encoder": encoder, "store": {"root": str(towers["root"] / f"store-{name}"),
                                                         "embedding_dtype": "float32"},
                           "precompute": {"batch_size": 4}})
    summary = stage.run(cfg).datasets["train"]
    assert summary.embedded == len(SIZES) and summary.skipped == 0
    contents = load_all(resolve_cache(cfg, "train"))
    order = np.argsort([int(k[1:]) for k in contents.keys])
    return contents.embeddings[order], cfg


def timm_reference(towers) -> torch.Tensor:
    """timm's own eval transform and forward, without litpipe."""
    model = timm.create_model("test_vit", num_classes=0, pretrained=True,
                              pretrained_cfg_overlay={"file": towers["timm"]}).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        return model(torch.stack([transform(image) for image in towers["images"]]))


def hf_outputs(folder: str, images, use_fast: bool):
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(folder, use_fast=use_fast)
    with torch.no_grad():
        return model, model(pixel_values=processor(images=images, return_tensors="pt").pixel_values,
                            output_hidden_states=True)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_a_timm_tower_caches_what_timms_own_transform_and_forward_give(ray_local, towers):
    expected = timm_reference(towers)
    pil, _ = precompute(towers, "timm-pil", {"source": "timm", "model": "test_vit", "pretrained": towers["timm"],
                                             "output": "pooled", "preprocess": "pil"})
    assert (pil - expected).abs().max() < 1e-5
    tensor, _ = precompute(towers, "timm-tensor", {"source": "timm", "model": "test_vit", "pretrained": towers["timm"],
                                                   "output": "pooled", "preprocess": "tensor"})
    assert cosines(tensor, expected).min() > 0.999


def test_a_hugging_face_dinov2_caches_what_its_processor_and_forward_give(ray_local, towers):
    _, slow = hf_outputs(towers["dinov2"], towers["images"], use_fast=False)
    pil, _ = precompute(towers, "dinov2-pil", {"source": "hf", "model": towers["dinov2"], "output": "pooled",
                                               "preprocess": "pil"})
    assert (pil - slow.pooler_output).abs().max() < 1e-5  # the processor's own PIL resize and crop
    _, fast = hf_outputs(towers["dinov2"], towers["images"], use_fast=True)  # transformers' default, torch resize
    tensor, _ = precompute(towers, "dinov2-tensor", {"source": "hf", "model": towers["dinov2"], "output": "pooled"})
    assert cosines(tensor, fast.pooler_output).min() > 0.999


@pytest.mark.parametrize("name", ["dinov2", "dinov2-reg"])
def test_cls_with_the_patch_mean_is_computed_from_the_final_tokens_registers_excluded(ray_local, towers, name):
    model, slow = hf_outputs(towers[name], towers["images"], use_fast=False)
    both, _ = precompute(towers, f"{name}-cls", {"source": "hf", "model": towers[name], "output": "cls_patch_mean",
                                                 "preprocess": "pil"})
    tokens = model.layernorm(slow.hidden_states[-1])  # the final tokens, from the hidden states
    registers = model.config.num_register_tokens if name == "dinov2-reg" else 0
    expected = torch.cat([tokens[:, 0], tokens[:, 1 + registers:].mean(dim=1)], dim=-1)
    assert both.shape == (len(SIZES), 64) and (both - expected).abs().max() < 1e-5


def test_a_timm_export_loads_in_plain_open_clip_with_the_cached_image_features(ray_local, towers, tmp_path):
    from litpipe.models.text_tower import build_text_tower, save_text_tower
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.train_text.export import export_model

    cached, cfg = precompute(towers, "timm-export", {"source": "timm", "model": "test_vit",
                                                     "pretrained": towers["timm"], "output": "pooled",
                                                     "preprocess": "pil"})
    cfg = validate_config({**cfg.model_dump(mode="json"), "train": {"tower": {"width": 32, "layers": 1, "heads": 2,
                                                                              "context_length": 16}}})
    tower = build_text_tower(cfg.train.tower, cached.shape[1])  # a text tower as training leaves one
    save_text_tower(str(tmp_path / "tower"), tower, clip_tokenizer(16), {"lit": "Lu", "loss": "softmax"})
    folder = export_model(cfg, str(tmp_path / "export"), checkpoint=str(tmp_path / "tower"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model.visual.trunk))
    with torch.no_grad():
        features = model.encode_image(torch.stack([transform(image) for image in towers["images"]]))
    assert cosines(features, cached).min() > 0.999


@pytest.mark.parametrize("encoder, fix", [
    ({"source": "timm", "model": "vit_nonexistent_patch16"}, r"encoder.model `vit_nonexistent_patch16`: timm cannot "
                                                             r"build it .*timm.list_models"),
    ({"source": "timm", "model": "test_vit", "output": "projected"}, r"has no projection; use output: pooled"),
    ({"source": "timm", "model": "test_resnet", "output": "cls_patch_mean"}, r"needs a ViT with a CLS token"),
])
def test_a_model_or_output_a_source_cannot_give_fails_before_any_work_with_the_key_and_fix(encoder, fix):
    with pytest.raises(EncoderError, match=fix):
        load_encoder(EncoderConfig(**encoder), device="cpu")


def test_open_clip_options_on_another_source_are_refused_naming_them():
    from litpipe.config import ConfigError

    with pytest.raises(ConfigError, match=r"image_size: open_clip options; a timm model brings its own"):
        validate_config({"data": {}, "encoder": {"source": "timm", "model": "test_vit", "image_size": 64}})
    with pytest.raises(ConfigError, match=r"set encoder.pretrained: null"):
        validate_config({"data": {}, "encoder": {"source": "hf", "model": "x", "pretrained": "y"}})


def readme_snippet(name: str) -> str:
    """The python block after `<!-- snippet: name -->` in the README: the code users copy is the code tested."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text[text.index(f"<!-- snippet: {name} -->"):]
    return block[block.index("```python\n") + len("```python\n"):block.index("\n```", block.index("```python"))]


def test_a_dinov2_export_loads_with_the_readme_snippet_and_gives_the_cached_features(ray_local, towers, tmp_path,
                                                                                    monkeypatch):
    from litpipe.models.text_tower import build_text_tower, save_text_tower
    from litpipe.models.tokenizer import clip_tokenizer
    from litpipe.train_text.export import export_model

    cached, cfg = precompute(towers, "dinov2-reg-export", {"source": "hf", "model": towers["dinov2-reg"],
                                                           "output": "cls_patch_mean", "preprocess": "pil"})
    cfg = validate_config({**cfg.model_dump(mode="json"), "train": {"tower": {"width": 32, "layers": 1, "heads": 2,
                                                                              "context_length": 16}}})
    tower = build_text_tower(cfg.train.tower, cached.shape[1])
    save_text_tower(str(tmp_path / "tower"), tower, clip_tokenizer(16), {"lit": "Lu", "loss": "softmax"})
    folder = export_model(cfg, str(tmp_path / "export"), checkpoint=str(tmp_path / "tower"))
    assert not (folder / "open_clip_config.json").exists()  # not an open_clip folder: nothing half-loads
    monkeypatch.chdir(tmp_path)
    photo = towers["images"][0]
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: the camera was turned, a viewer shows it rotated by 90 degrees
    photo.crop((0, 0, photo.width, photo.height * 3 // 4)).save(tmp_path / "cat.jpg", exif=exif)
    code = readme_snippet("hf-export").replace('folder = "runs/export"', f'folder = "{folder}"')
    names: dict = {}
    exec(compile(code, "README.md:hf-export", "exec"), names)
    assert cosines(names["image_features"](towers["images"]), cached).min() > 0.999
    with torch.no_grad():  # the text tower is the one trained, and the probabilities are over the two prompts
        expected = tower.eval()(clip_tokenizer(16)(["a photo of a cat", "a photo of a dog"]))
    assert torch.allclose(names["texts"], expected, atol=1e-6)
    assert names["probabilities"].shape == (1, 2)
    decoded = decode_image((tmp_path / "cat.jpg").read_bytes(), 10**8)  # as precompute decodes it: upright
    assert names["image"].size == decoded.size != Image.open(tmp_path / "cat.jpg").size
    assert np.array_equal(np.asarray(names["image"]), np.asarray(decoded))


def test_a_model_folder_rewritten_in_place_is_described_again(tmp_path):
    """describe_encoder answers repeats from memory, keyed by the weights' files: a folder's rewrite changes the key."""
    import os

    from litpipe.precompute.job import _weights_on_disk

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"0" * 8)
    cfg = EncoderConfig(source="hf", model=str(folder))
    before = _weights_on_disk(cfg)
    (folder / "model.safetensors").write_bytes(b"1" * 9)
    os.utime(folder / "model.safetensors", ns=(0, 0))
    assert _weights_on_disk(cfg) != before
    assert _weights_on_disk(EncoderConfig(source="hf", model="facebook/dinov2-small")) == []  # a hub id: nothing local
