"""litpipe/images.py and precompute/decode.py: every odd image mode converted as it looks, bad bytes turned into reasons."""

import io

import numpy as np
import pytest
from PIL import Image

from litpipe.images import DecodeError, decode_image
from precompute_samples import encode_image, image_bytes

MAX = 10_000_000


def rgb(image_data: bytes) -> np.ndarray:
    out = decode_image(image_data, MAX)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)


def test_grayscale_and_bilevel_become_equal_channels():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    np.testing.assert_array_equal(rgb(encode_image(Image.fromarray(grey, "L"), "PNG")), np.repeat(grey[..., None], 3, 2))
    bits = Image.fromarray(grey > 100).convert("1")
    np.testing.assert_array_equal(rgb(encode_image(bits, "PNG"))[..., 0], np.where(grey > 100, 255, 0))


def test_palette_takes_its_colours_and_its_transparent_index_shows_white():
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2, 1])
    np.testing.assert_array_equal(rgb(encode_image(palette, "PNG"))[0], [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 0]])
    palette.info["transparency"] = 1
    out = io.BytesIO()
    palette.save(out, "PNG", transparency=1)
    np.testing.assert_array_equal(rgb(out.getvalue())[0], [[255, 0, 0], [255, 255, 255], [0, 0, 255], [255, 255, 255]])


def test_alpha_is_composited_on_white_not_dropped():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, :, :3] = [10, 20, 30]
    rgba[0, :, 3] = [0, 128, 255]
    got = rgb(encode_image(Image.fromarray(rgba, "RGBA"), "PNG"))[0]
    alpha = np.array([0, 128, 255])[:, None] / 255.0
    expected = np.array([10, 20, 30]) * alpha + 255 * (1 - alpha)  # float64 reference
    np.testing.assert_allclose(got, expected, atol=1)
    la = Image.fromarray(np.stack([np.full((1, 2), 50, np.uint8), np.array([[0, 255]], np.uint8)], -1), "LA")
    np.testing.assert_array_equal(rgb(encode_image(la, "PNG"))[0], [[255, 255, 255], [50, 50, 50]])


def test_16bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535, 1000]], dtype=np.uint16)
    got = rgb(encode_image(Image.fromarray(values), "PNG"))[0, :, 0]
    np.testing.assert_array_equal(got, np.rint(values[0] / 257.0))


def test_cmyk_becomes_the_rgb_it_prints_as():
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
    np.testing.assert_array_equal(rgb(encode_image(cmyk, "TIFF"))[0], [[255, 255, 255], [0, 255, 255], [0, 0, 0]])
    jpeg = rgb(encode_image(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    np.testing.assert_allclose(jpeg.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)  # red, within JPEG loss


@pytest.mark.parametrize("data, reason", [
    (b"", "empty image"),
    (b"definitely not an image", "undecodable image"),
    (image_bytes(0, size=(64, 64))[:300], "truncated image"),
])
def test_bad_bytes_raise_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, MAX)


def test_bomb_is_refused_from_its_header_before_decoding():
    bomb = encode_image(Image.new("L", (3000, 2000)), "PNG")
    assert len(bomb) < 50_000
    with pytest.raises(DecodeError, match="decompression bomb: 3000x2000"):
        decode_image(bomb, max_pixels=5_000_000)
    assert decode_image(bomb, max_pixels=6_000_000).size == (3000, 2000)


def _photo_jpeg(seed: int, size=(96, 64), mode="RGB", exif_rotate=False) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    pixels = np.clip(np.stack([x * 2.5, y * 3.5, (x + y) * 1.5], -1) + rng.normal(0, 5, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to view
        image.save(out, "JPEG", quality=92, exif=exif)
    else:
        image.save(out, "JPEG", quality=92)
    return out.getvalue()


def test_jpegs_decoded_on_the_device_match_the_cpu_path_and_what_it_cannot_take_falls_back():
    """On this CPU-only machine the device decoder is torchvision's on the CPU: the same code path a
    GPU takes with nvjpeg, fallbacks included."""
    import torch

    from litpipe.config import EncoderConfig
    from litpipe.models.image_encoder import load_encoder
    from litpipe.precompute.decode import decode_part
    from litpipe.precompute.device_decode import finish_decoding
    from litpipe.sources import Sample
    from conftest import TINY_ARCHITECTURE

    enc = load_encoder(EncoderConfig(model="litpipe-test-jpeg", architecture=TINY_ARCHITECTURE, preprocess="tensor"),
                       device="cpu")
    good = _photo_jpeg(1)
    cut = good[: len(good) // 2]  # a valid header, the rest missing: the device refuses it, so does the CPU
    samples = [Sample("rgb", good, ["a"]), Sample("grey", _photo_jpeg(2, mode="L"), ["b"]),
               Sample("cmyk", _photo_jpeg(3, mode="CMYK"), ["c"]), Sample("rotated", _photo_jpeg(4, exif_rotate=True), ["d"]),
               Sample("png", encode_image(Image.new("RGB", (50, 40), (9, 99, 199)), "PNG"), ["e"]), Sample("cut", cut, ["f"])]
    on_cpu = decode_part(samples, enc.pixels.cpu_step, MAX)
    travelled = decode_part(samples, enc.pixels.cpu_step, MAX, jpeg_on_device=True)
    assert [p.ndim for p in travelled.pixels] == [1, 1, 3, 1, 3, 1]  # JPEG bytes, except CMYK and PNG
    device = finish_decoding(travelled, enc.pixels.cpu_step, torch.device("cpu"), MAX)
    assert device.keys == on_cpu.keys == ["rgb", "grey", "cmyk", "rotated", "png"]
    assert device.errors == on_cpu.errors and on_cpu.errors[0]["key"] == "cut"
    assert on_cpu.errors[0]["reason"].startswith("truncated image")
    assert tuple(device.pixels[3].shape) == (3, 96, 64)  # EXIF orientation applied, as on the CPU path
    ours = enc.pixels.to_device(device.pixels, torch.device("cpu"))
    reference = enc.pixels.to_device(on_cpu.pixels, torch.device("cpu"))
    assert (ours - reference).abs().max() < 0.05  # libjpeg builds may differ by a level here and there


def test_a_read_task_imports_no_torch(tmp_path):
    """Read workers start while the encoder actor imports torch and open_clip on the same cores:
    what they unpickle (read_parts and the tensor path's CPU step) must not pull torch in."""
    import pickle
    import subprocess
    import sys

    from conftest import TINY_ARCHITECTURE
    from litpipe.config import EncoderConfig
    from litpipe.models.image_encoder import load_encoder
    from litpipe.precompute.read import read_parts

    step = load_encoder(EncoderConfig(model="litpipe-test-read", architecture=TINY_ARCHITECTURE), device="cpu").pixels.cpu_step
    (tmp_path / "task.pkl").write_bytes(pickle.dumps((read_parts, step)))
    probe = ("import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read()); "
             "print(sorted(m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "task.pkl")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_image_decodes_a_file_or_its_bytes_as_precompute_does_and_unlike_plain_pil(tmp_path):
    """The README's snippets reproduce cached vectors with `open_image`: upright and on white, where
    `Image.open(...).convert("RGB")` is on its side and shows the transparent pixels' hidden colour."""
    from litpipe.images import open_image

    sideways = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3))
    exif = Image.Exif()
    exif[0x0112] = 8  # EXIF orientation: rotate 90 degrees to show it upright
    sideways.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    hidden = Image.new("RGBA", (3, 2), (200, 10, 10, 0))  # fully transparent red
    hidden.save(tmp_path / "clear.png")
    for name in ("photo.jpg", "clear.png"):
        data = (tmp_path / name).read_bytes()
        expected = np.asarray(decode_image(data, MAX))
        for source in (tmp_path / name, str(tmp_path / name), f"file://{tmp_path / name}", data):
            assert np.array_equal(np.asarray(open_image(source)), expected)
    assert open_image(tmp_path / "photo.jpg").size == (4, 6) != Image.open(tmp_path / "photo.jpg").size
    assert (np.asarray(open_image(tmp_path / "clear.png")) == 255).all()
    assert (np.asarray(Image.open(tmp_path / "clear.png").convert("RGB"))[..., 0] == 200).all()
    with pytest.raises(DecodeError, match="decompression bomb"):
        open_image(tmp_path / "photo.jpg", max_pixels=10)
