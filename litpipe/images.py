"""Image bytes -> RGB PIL image as litpipe decodes them, every odd mode converted the way it looks.

`PIL.Image.open(...).convert("RGB")` (what open_clip's transform starts from) differs for several
images, on purpose here: it ignores EXIF orientation (a phone photo stays on its side), drops alpha
onto whatever colour the transparent pixels hold, clips 16-bit grey to white and ignores CMYK colour
profiles. Precompute decodes every image with `decode_image`; `open_image` is the same for a file,
so code that reproduces cached features decodes as the cache did. Bombs are refused unread.

No torch here: precompute's read tasks import this, and start in a second instead of five.
"""

from __future__ import annotations

import io
import warnings

import fsspec
import numpy as np
from PIL import Image, ImageCms, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # precompute.max_image_pixels' default (PIL's own bomb bound)


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A file (path or fsspec URL) or its bytes, decoded as precompute decodes it: upright, RGB, on white."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decode_image(bytes(source), max_pixels)
    with fsspec.open(str(source), "rb") as f:
        return decode_image(f.read(), max_pixels)


BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as a viewer would


class DecodeError(Exception):
    """An image that cannot be used; str() is the reason recorded in the cache."""


def decode_image(data: bytes | None, max_pixels: int, draft_to: int | None = None) -> Image.Image:
    """Bytes -> RGB image, upright (EXIF orientation applied); DecodeError with the reason otherwise.

    `draft_to`: a JPEG is decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT (PIL's `draft`) where
    both sides stay >= it: a fraction of the work of a full decode and its resize."""
    if not data:
        raise DecodeError("empty image (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_bounded(data, max_pixels)
            if draft_to:  # JPEG (and MPO) only: other formats' draft does nothing
                image.draft(None, (draft_to, draft_to))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a copy of every image otherwise
            return to_rgb(image)
    except DecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise DecodeError(f"decompression bomb: {err}") from None
    except OSError as err:
        reason = "truncated image" if "truncated" in str(err) else "undecodable image"
        raise DecodeError(f"{reason}: {err}") from None
    except Exception as err:  # PIL raises many types for corrupt data (ValueError, SyntaxError, ...)
        raise DecodeError(f"undecodable image: {type(err).__name__}: {err}") from None


def open_header(data: bytes) -> Image.Image:
    """Open reading only the header, whatever its size claims (PIL's global bomb bound left out)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_bounded(data: bytes, max_pixels: int) -> Image.Image:
    """Open reading only the header, and refuse more than `max_pixels` before any pixel is decoded."""
    image = open_header(data)
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} = {width * height} pixels > "
                          f"precompute.max_image_pixels ({max_pixels})")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB as it should look."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG/TIFF): scale 0..65535 to 0..255; convert() would clip everything above 255.
        grey = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        scale = 255.0 if grey.size and grey.max() <= 1.0 else 1.0  # float images are 0..1 by convention
        image = Image.fromarray(np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8), "L")
    elif mode == "CMYK" and image.info.get("icc_profile"):
        profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
        return ImageCms.profileToProfile(image, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    elif mode == "P" and "transparency" in image.info or mode == "PA":
        image = image.convert("RGBA")
    elif mode in ("LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, BACKGROUND)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")
