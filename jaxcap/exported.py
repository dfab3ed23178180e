"""A captioner written by ``jaxcap export``, run with jax, numpy and pillow alone.

This file imports nothing of jaxcap: copy it beside your code to caption without
installing jaxcap::

    import exported                      # or: from jaxcap import exported
    captioner = exported.load("exported/shapes")
    captioner.caption(["cat.jpg", pixels])   # [{"caption", "score", "tokens"}, ...]

The artifact's files are checked against the SHA-256 digests ``captioner.json``
records before anything is read. Images are prepared as jaxcap prepares them (a JPEG
decoded at a reduced scale that leaves twice the target, EXIF rotation applied,
16-bit scaled, transparent pixels shown on white, a bilinear resize to the square,
whole or centre-cropped); the exported function normalises them itself. XLA
compiles the function at its first call for each batch size; ``load(...,
compilation_cache=DIR)`` keeps the compiled programs in DIR for the next process.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import jax
import numpy as np
from jax import export
from PIL import Image, ImageOps

FORMAT = "jaxcap.exported"
END, SPECIAL = 2, 4  # <end>'s id; ids below SPECIAL are <pad>, <start>, <end>, <unk>


class ArtifactError(Exception):
    """An exported captioner that cannot be used as it is; the message names the file."""


def load(directory, compilation_cache=None) -> "Captioner":
    directory = Path(directory)
    try:
        spec = json.loads((directory / "captioner.json").read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{directory / 'captioner.json'}: not readable ({error})") from None
    if spec.get("format") != FORMAT:
        raise ArtifactError(f"{directory / 'captioner.json'}: not a jaxcap export")
    for name, digest in spec["sha256"].items():
        try:
            data = (directory / name).read_bytes()
        except OSError as error:
            raise ArtifactError(f"{directory / name}: missing ({error.strerror})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{directory / name}: its SHA-256 is not the one captioner.json "
                                "records (the file was changed or cut short)")
    if compilation_cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    function = export.deserialize(bytearray((directory / "captioner.jax").read_bytes()))
    with np.load(directory / "variables.npz") as arrays:
        variables = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    return Captioner(function, variables, spec)


class Captioner:
    """``caption(images)``: one ``{"caption", "score", "tokens"}`` per image, in order."""

    def __init__(self, function, variables: list, spec: dict):
        self.function, self.variables, self.spec = function, variables, spec
        self.size = spec["preprocessing"]["image_size"]
        self.resize = spec["preprocessing"]["resize"]
        self.words = spec["vocabulary"]

    def caption(self, images) -> list[dict]:
        tokens, scores, _ = self(np.stack([self.pixels(image) for image in images]))
        return [self.result(row, score) for row, score in zip(tokens, scores)]

    def __call__(self, pixels: np.ndarray):
        """``(tokens, scores, attention)`` of uint8 ``pixels`` (N, size, size, 3)."""
        return tuple(np.asarray(x) for x in self.function.call(self.variables, pixels))

    def result(self, tokens, score) -> dict:
        ids = [int(t) for t in tokens[1:]]
        ids = ids[:ids.index(END)] if END in ids else ids
        return {"caption": " ".join(self.words[i] for i in ids if i >= SPECIAL),
                "score": float(score), "tokens": ids}

    def pixels(self, image) -> np.ndarray:
        """A path, a file's bytes or an RGB array, as the exported function takes it."""
        if isinstance(image, np.ndarray):
            if image.shape == (self.size, self.size, 3) and image.dtype == np.uint8:
                return image
            return resized(Image.fromarray(image).convert("RGB"), self.size, self.resize)
        source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
        with Image.open(source) as opened:
            opened.draft("RGB", (2 * self.size, 2 * self.size))
            return resized(to_rgb(ImageOps.exif_transpose(opened)), self.size, self.resize)


# How jaxcap turns any image into the pixels a model reads (jaxcap.data.images calls these:
# one implementation, here, so that this file alone prepares images the same way).

def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as RGB: CMYK, palette and gray converted, 16-bit scaled (not clipped)
    to 8 bits, transparent pixels shown as on a white page."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # scaled to 8 bits
        wide = np.clip(np.asarray(image, dtype=np.int32), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float32)), 0, 255)
        return Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            image.mode == "P" and "transparency" in image.info):  # on a white page
        rgba = image.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return image.convert("RGB")


def resized(image: Image.Image, size: int, resize: str) -> np.ndarray:
    """An RGB image as ``(size, size, 3)`` uint8: squashed whole (``direct``) or its shorter
    side resized and the centre cropped (``center_crop``), bilinear."""
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
