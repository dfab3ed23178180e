"""Image files of every kind a user's folder may hold, written on the fly."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (16-bit RGB, bogus sizes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A gray PNG of ``width`` x ``height`` black pixels: a few hundred KB that decode to
    ``width * height`` bytes (100 MB by default) and three times that as RGB."""
    row = b"\x00" * (width + 1)  # filter byte, then the pixels
    return png_bytes(width, height, 8, 0, row * height)


def halves(width: int, height: int, left=(255, 0, 0), right=(0, 0, 255)) -> np.ndarray:
    """An RGB array whose left half is ``left`` and right half ``right``."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:, : width // 2] = left
    pixels[:, width // 2:] = right
    return pixels


def write_every_kind(folder: Path, photo: Path) -> dict[str, str | None]:
    """Writes one file per kind into ``folder``; returns name -> expected skip reason
    (a substring) or None for files that must be converted."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.asarray(Image.open(photo).convert("RGB").resize((96, 64)))
    expected: dict[str, str | None] = {}

    (folder / "zero_bytes.jpg").write_bytes(b"")
    expected["zero_bytes.jpg"] = "empty file"
    Image.fromarray(rgb).save(folder / "whole.jpg", quality=95)
    data = (folder / "whole.jpg").read_bytes()
    expected["whole.jpg"] = None
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    expected["truncated.jpg"] = "truncated or corrupt"
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (folder / "corrupt.jpg").write_bytes(data[:20] + noise)
    expected["corrupt.jpg"] = "corrupt"
    (folder / "notes.txt").write_text("a caption file, not an image\n")
    expected["notes.txt"] = "not a readable image"

    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(folder / "palette.png")
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :48, 3] = 0  # left half fully transparent: shows as white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    gray16 = (np.arange(96 * 64).reshape(64, 96) * 10).astype(">u2")
    (folder / "gray16.png").write_bytes(png_bytes(
        96, 64, 16, 0, b"".join(b"\x00" + row.tobytes() for row in gray16)))
    rgb16 = (rgb.astype(np.uint16) * 257).astype(">u2")
    (folder / "rgb16.png").write_bytes(png_bytes(
        96, 64, 16, 2, b"".join(b"\x00" + row.tobytes() for row in rgb16)))
    Image.new("RGB", (1, 1), (10, 200, 30)).save(folder / "one_pixel.png")
    huge = Image.new("RGB", (10000, 10000), (255, 0, 0))
    huge.paste((0, 0, 255), (5000, 0, 10000, 10000))
    huge.save(folder / "huge_10000.jpg", quality=80)
    for name in ("cmyk.jpg", "gray.png", "palette.png", "rgba.png", "gray16.png", "rgb16.png",
                 "one_pixel.png", "huge_10000.jpg"):
        expected[name] = None
    # A header claiming 20000x20000 pixels: refused before anything is decoded.
    (folder / "bomb.png").write_bytes(png_bytes(20000, 20000, 8, 2, b""))
    expected["bomb.png"] = "image too large"
    return expected
