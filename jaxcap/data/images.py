"""Decoding any image file a user has into a fixed-size RGB uint8 array.

Everything that can be converted is converted correctly (CMYK, grayscale,
palette, alpha, 16-bit, EXIF rotation); everything else raises
``ImageError`` with a one-line reason, so that callers can skip and count it.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("direct", "center_crop")

# Pillow warns above MAX_IMAGE_PIXELS (about 89 Mpx) and refuses twice that as a
# decompression bomb. A 10000x10000 photo is legitimate, so the warning is
# silenced; the refusal stays and becomes a skip reason.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Pillow modes holding 16- or 32-bit integers: scaled, never clipped, to 8 bits.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageError(Exception):
    """An image file that cannot be turned into pixels; the message is the reason."""


def load_image(source: str | os.PathLike | bytes, size: int, resize: str = "direct") -> np.ndarray:
    """Returns an image file (a path, or its bytes) as an RGB ``(size, size, 3)`` uint8 array.

    ``resize``: ``direct`` squashes the whole image to ``size`` x ``size`` (the
    seed's choice: captions describe the whole picture); ``center_crop``
    resizes the shorter side to ``size`` and crops the centre.
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        empty, source = len(source) == 0, io.BytesIO(source)
    else:
        empty = os.path.getsize(source) == 0
    if empty:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(source) as image:
            # JPEG can decode at 1/2..1/8 scale for free; keep at least twice
            # the target so that the final resize still antialiases properly.
            image.draft("RGB", (2 * size, 2 * size))
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a readable image: unknown format or corrupt header") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(f"truncated or corrupt image: {error}") from None
    return _resize(rgb, size, resize)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.float64)
        gray = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        # Transparent pixels hold arbitrary colours; show them as on a white page.
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, size: int, resize: str) -> np.ndarray:
    if resize == "center_crop":
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
