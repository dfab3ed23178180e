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

from jaxcap.exported import resized, to_rgb

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
            rgb = to_rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError as error:
            raise ImageError(f"image too large: {error}") from None
        except Exception as error:  # noqa: BLE001  (see _unreadable)
            raise _unreadable(error) from None
    return resized(rgb, size, resize)


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
