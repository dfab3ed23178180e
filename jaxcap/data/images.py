"""Decoding any image file a user has into a fixed-size RGB uint8 array.

Everything that can be converted is converted correctly (CMYK, grayscale,
palette, alpha, 16-bit, EXIF rotation); everything else raises
``ImageError`` with a one-line reason, so that callers can skip and count it.

An image's decoded size is known from its header before any pixel is decoded
(``decoded_size``; a JPEG decodes at a reduced scale when that still leaves twice
the target size): a caller that sets ``max_pixels`` refuses larger images
(``ImageTooLarge``) before decoding them, and ``DECODE_BYTES_PER_PIXEL`` bounds the
memory a decode may hold at once, for a server to budget its decoding.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

RESIZE_POLICIES = ("direct", "center_crop")
# The most memory a decode holds at once per decoded pixel: an alpha image is held as
# decoded, as RGBA, on a white page, composited and as RGB (4 + 4 + 4 + 4 + 3 bytes), a
# 16-bit one as decoded, as 32-bit integers, as 8-bit gray and as RGB (2 + 4 + 1 + 3), plus
# an EXIF rotation's copy.
DECODE_BYTES_PER_PIXEL = 24

# Pillow warns above MAX_IMAGE_PIXELS (about 89 Mpx) and refuses twice that as a
# decompression bomb. A 10000x10000 photo is legitimate, so the warning is
# silenced; the refusal stays and becomes a skip reason.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Pillow modes holding 16- or 32-bit integers: scaled, never clipped, to 8 bits.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class ImageError(Exception):
    """An image file that cannot be turned into pixels; the message is the reason."""


class ImageTooLarge(ImageError):
    """An image that would decode to more pixels than the caller allows."""


def _opened(source, size: int):
    """The image, opened (its header read, nothing decoded) at the scale it will decode at."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        empty, source = len(source) == 0, io.BytesIO(source)
    else:
        empty = os.path.getsize(source) == 0
    if empty:
        raise ImageError("empty file (0 bytes)")
    try:
        image = Image.open(source)
    except Image.DecompressionBombError as error:
        raise ImageError(f"image too large: {error}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a readable image: unknown format or corrupt header") from None
    except Exception as error:  # noqa: BLE001  (see _unreadable)
        raise _unreadable(error) from None
    try:
        # JPEG can decode at 1/2..1/8 scale for free; keep at least twice
        # the target so that the final resize still antialiases properly.
        image.draft("RGB", (2 * size, 2 * size))
        return image
    except Exception as error:  # noqa: BLE001
        image.close()
        raise _unreadable(error) from None


def _unreadable(error: Exception) -> Exception:
    """What Pillow raised on a file's bytes, as the reason it is skipped. Beside the errors
    of truncated and corrupt files it documents, a hostile file can make a decoder raise
    others (an IndexError, a struct.error); they say the same. Running out of memory is not
    the file's fault, and is raised as it is."""
    if isinstance(error, MemoryError):
        return error
    if isinstance(error, (OSError, SyntaxError, ValueError)):
        return ImageError(f"truncated or corrupt image: {error}")
    return ImageError(f"not a readable image ({type(error).__name__}: {error})")


def decoded_size(source: str | os.PathLike | bytes, size: int) -> tuple[int, int]:
    """``(width, height)`` the image decodes to for a target of ``size``, from its header
    alone; ``ImageError`` where the header is not a readable image's."""
    with _opened(source, size) as image:
        return image.size


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"decodes to {width} x {height} pixels "
                            f"({width * height / 1e6:.1f} Mpx), over the limit of "
                            f"{max_pixels / 1e6:.1f} Mpx")


def load_image(source: str | os.PathLike | bytes, size: int, resize: str = "direct",
               max_pixels: int | None = None) -> np.ndarray:
    """Returns an image file (a path, or its bytes) as an RGB ``(size, size, 3)`` uint8 array.

    ``resize``: ``direct`` squashes the whole image to ``size`` x ``size`` (the
    seed's choice: captions describe the whole picture); ``center_crop``
    resizes the shorter side to ``size`` and crops the centre. ``max_pixels``: an
    image that would decode to more is refused (``ImageTooLarge``) before decoding
    (without it, Pillow's own limit of about 179 Mpx applies).
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    with _opened(source, size) as image:
        _check_pixels(*image.size, max_pixels)
        try:
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as error:
            raise ImageError(f"image too large: {error}") from None
        except Exception as error:  # noqa: BLE001  (see _unreadable)
            raise _unreadable(error) from None
    return _resize(rgb, size, resize)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INTEGER_MODES:
        # round(x / 257) in integers (257 is odd: no ties), on 32-bit values clipped to 16 bits
        wide = np.clip(np.asarray(image, dtype=np.int32), 0, 65535)
        gray = ((wide + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)
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


# Errors that say something about the file itself, not about the moment it was read.
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def load_or_reason(source, image_size: int, resize: str, max_pixels: int | None = None):
    """``(pixels, None, False)``; or ``(None, why, retryable)`` for a file that could not
    be used: ``retryable`` is False when the file is not a usable image (it is skipped),
    True when reading failed for a reason that may pass (it is read again on a rerun).

    ``source``: a path, or a function returning the file's bytes (a dataset record).
    """
    try:
        return load_image(source() if callable(source) else source, image_size, resize,
                          max_pixels), None, False
    except FileNotFoundError:
        return None, "no such file", False
    except ImageError as error:
        return None, str(error), False
    except _PERMANENT_OS_ERRORS as error:
        return None, error.strerror or str(error), False
    except OSError as error:  # EIO, EACCES, ESTALE, ENOTCONN, ...: may pass
        return None, error.strerror or str(error), True
