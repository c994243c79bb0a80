"""litpipe/models/pixels.py against open_clip's own eval transform on real JPEGs.

`pil` must equal open_clip's transform (float rounding aside); `tensor` is measured: its pixel
error and what it does to embeddings are printed (pytest -s) and bounded tightly enough that a
wrong crop, channel order, interpolation or normalisation fails.
"""

import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import TINY_ARCHITECTURE
from litpipe.config import EncoderConfig
from litpipe.errors import UserError
from litpipe.models.image_encoder import load_encoder
from litpipe.models.pixels import PixelSteps


def photo(seed: int, size=(640, 480)) -> Image.Image:
    """A decoded JPEG with photo-like content: smooth gradients, solid shapes with edges, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 255 / size[0], y * 255 / size[1], (x + 2 * y) * 255 / (size[0] + 2 * size[1])], -1)
    for _ in range(4):
        cy, cx, r = rng.integers(0, size[1]), rng.integers(0, size[0]), rng.integers(size[1] // 10, size[1] // 3)
        base[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    pixels = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


SIZES = [(640, 480), (480, 640), (1000, 1000), (100, 50), (2400, 1800)]


def encoder(mode: str, image_size: int = 224, **overrides):
    return load_encoder(EncoderConfig(model="litpipe-test-pixels", architecture=TINY_ARCHITECTURE, image_size=image_size,
                                      preprocess=mode, **overrides), device="cpu")


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_pil_path_equals_open_clips_transform(resize_mode, interpolation):
    enc = encoder("pil", image_resize_mode=resize_mode, image_interpolation=interpolation)
    images = [photo(i, size) for i, size in enumerate(SIZES)]
    ours = enc.pixels.to_device([enc.pixels.cpu_step.cpu(im) for im in images], torch.device("cpu"))
    reference = torch.stack([enc.preprocess(im) for im in images])
    assert ours.shape == reference.shape == (len(images), 3, 224, 224)
    assert (ours - reference).abs().max().item() < 1e-6


def test_the_tensor_path_stays_close_to_open_clip_and_a_broken_one_would_not(capsys):
    enc = encoder("tensor")
    images = [photo(10 + i, size) for i, size in enumerate(SIZES * 2)]
    reference = torch.stack([enc.preprocess(im) for im in images])
    cpu_side = [enc.pixels.cpu_step.cpu(im) for im in images]
    assert max(min(a.shape[:2]) for a in cpu_side) < 1000  # the 2400x1800 photo was shrunk before travelling
    ours = enc.pixels.to_device(cpu_side, torch.device("cpu"))
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    error_255 = ((ours - reference) * std * 255).abs()  # back in 0..255 pixel units
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(enc.model.encode_image(ours), enc.model.encode_image(reference))
    with capsys.disabled():
        print(f"\ntensor path vs open_clip PIL (224 px, {len(images)} JPEGs): max |error| {error_255.max():.1f}/255, "
              f"mean {error_255.mean():.3f}/255, embedding cosine min {cosine.min():.6f}")
    assert error_255.mean() < 1.0 and cosine.min() > 0.999
    shifted = torch.roll(ours, shifts=2, dims=-1)  # a crop two pixels off
    swapped = ours.flip(1)  # BGR instead of RGB
    for broken in (shifted, swapped):
        assert ((broken - reference) * std * 255).abs().mean() > 3 * error_255.mean()


def test_mixed_sizes_in_one_batch_equal_one_image_at_a_time():
    enc = encoder("tensor")
    cpu_side = [enc.pixels.cpu_step.cpu(photo(20 + i, size)) for i, size in enumerate(SIZES + SIZES[:2])]
    together = enc.pixels.to_device(cpu_side, torch.device("cpu"))
    alone = torch.cat([enc.pixels.to_device([image], torch.device("cpu")) for image in cpu_side])
    assert torch.equal(together, alone)


def test_the_path_is_in_the_encoder_fingerprint_so_caches_never_mix():
    pil, tensor = encoder("pil", image_size=32), encoder("tensor", image_size=32)
    assert pil.fingerprint["preprocess"]["pixels"]["path"] == "pil"
    assert tensor.fingerprint["preprocess"]["pixels"]["path"] == "tensor"
    assert pil.fingerprint["weights_sha256"] == tensor.fingerprint["weights_sha256"]
    assert pil.fingerprint != tensor.fingerprint


def test_the_tensor_path_refuses_open_clips_pad_to_square_mode_with_the_fix():
    with pytest.raises(UserError, match="encoder.preprocess: tensor cannot do the `longest` resize mode .open_clip's .*preprocess: pil"):
        encoder("tensor", image_resize_mode="longest")


def test_the_tensor_path_crops_odd_margins_where_a_hugging_face_processor_does():
    """transformers' center_crop floors the offset; torchvision's rounds half to even: on a margin of 3 they
    differ by a row. Resizing is left out (the image is already at the processor's size) so the crop is all."""
    from transformers import CLIPImageProcessor

    from litpipe.models.image_towers import hf_transform

    processor = CLIPImageProcessor(do_resize=False, size={"shortest_edge": 35}, crop_size={"height": 32, "width": 32},
                                   do_center_crop=True, do_convert_rgb=True)
    image = np.random.default_rng(3).integers(0, 256, (35, 50, 3), dtype=np.uint8)
    transform, settings = hf_transform(processor)
    expected = torch.from_numpy(processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"])
    got = PixelSteps(transform, settings, "tensor").to_device([image], torch.device("cpu"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    rounded = PixelSteps(transform, {**settings, "crop": "round"}, "tensor").to_device([image], torch.device("cpu"))
    assert (rounded - expected).abs().max() > 0.1  # torchvision's rule would be a row off


def jpeg_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def test_jpeg_draft_decodes_large_photos_small_stays_close_and_is_in_the_fingerprint(capsys):
    """encoder.jpeg_draft: libjpeg decodes at 1/2, 1/4 or 1/8 scale where both sides keep the resize
    target, so a 2400x1800 photo is decoded at 300x225 for a 224 input; the model's input stays within
    a few levels of a full decode, and the fingerprint names it, so the two never share a cache."""
    from litpipe.images import decode_image

    full, drafted = encoder("pil"), encoder("pil", jpeg_draft=True)
    assert full.pixels.cpu_step.draft_to is None and drafted.pixels.cpu_step.draft_to == 224
    assert decode_image(jpeg_bytes(photo(0, (2400, 1800))), 10**9, 224).size == (300, 225)  # 1/8: 225 >= 224
    assert decode_image(jpeg_bytes(photo(0, (300, 200))), 10**9, 224).size == (300, 200)  # no scale keeps 224
    png = io.BytesIO()
    photo(0, (2400, 1800)).save(png, "PNG")
    assert decode_image(png.getvalue(), 10**9, 224).size == (2400, 1800)  # a draft is JPEG's alone
    blobs = [jpeg_bytes(photo(30 + i, size)) for i, size in enumerate(SIZES)]
    inputs = {name: enc.pixels.to_device([enc.pixels.cpu_step.cpu(decode_image(b, 10**9, enc.pixels.cpu_step.draft_to))
                                          for b in blobs], torch.device("cpu"))
              for name, enc in (("full", full), ("draft", drafted))}
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    error_255 = ((inputs["draft"] - inputs["full"]) * std * 255).abs()
    with capsys.disabled():
        print(f"\njpeg_draft vs full decode (224 px, pil, {len(blobs)} JPEGs): mean |error| {error_255.mean():.3f}/255, "
              f"max {error_255.max():.1f}/255")
    assert 0 < error_255.mean() < 2.0
    assert drafted.fingerprint["preprocess"]["pixels"]["jpeg_draft_to"] == 224
    assert drafted.fingerprint != full.fingerprint and drafted.fingerprint["weights_sha256"] == full.fingerprint["weights_sha256"]
