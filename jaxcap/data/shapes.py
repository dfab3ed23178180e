"""``shapes``: a grounded synthetic captioning dataset, jaxcap's embedded default.

Photo-like scenes (textured, noisy, unevenly lit backgrounds; anti-aliased
objects with sensor noise) of 1 to 3 objects drawn from 6 colours x 5 shapes x
2 sizes at free positions. With ``backgrounds="photos"`` the same objects and
captions lie on crops of real photographs (the ones bundled in
``jaxcap/data/samples``) instead: clutter, edges and saturated colours of
their own, which a model has to look past. Each image has 5 reference
captions from varied templates naming attributes, counts and spatial
relations, and full grounding: every object's box, and for every caption the
object each word refers to.

Splits: ``train``, ``val`` and ``test`` use the same colour-shape pairs;
``novel`` shows at least one pair that never occurs in the other splits (held
out by seed, one per colour and per shape at most, so every colour and every
shape is still seen in training).

Everything is a pure function of ``ShapesSpec`` (the seed and the sizes), so a
dataset is rebuilt bit for bit anywhere.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import importlib.resources
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxcap.data.readers import (OBJECTS_FILE, OFFICIAL_IMAGE_DIRS, OFFICIAL_SPLIT_FILES,
                                 OFFICIAL_TOKEN_FILE, DataError)

COLOURS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 75, 215),
    "yellow": (240, 205, 30), "purple": (135, 50, 185), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
PLURALS = {shape: shape + "s" for shape in SHAPES}
SIZES = {"small": 0.2, "large": 0.34}  # side of the object's box, as a fraction of the image
NUMBERS = {1: "one", 2: "two", 3: "three"}
SPLITS = ("train", "val", "test", "novel")
BACKGROUNDS = {"texture": "on a textured background", "photos": "on a photo"}
NOT_GROUNDED = -1


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Everything the dataset depends on."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 6000
    num_val: int = 500
    num_test: int = 500
    num_novel: int = 500
    num_held_out_pairs: int = 4
    captions_per_image: int = 5
    backgrounds: str = "texture"  # or "photos"

    def __post_init__(self):
        for name, least in (("image_size", 1), ("num_train", 0), ("num_val", 0), ("num_test", 0),
                            ("num_novel", 0), ("num_held_out_pairs", 0),
                            ("captions_per_image", 1)):
            if getattr(self, name) < least:
                raise DataError(f"the shapes dataset's {name} must be at least {least}, "
                                f"got {getattr(self, name)}")
        if self.backgrounds not in BACKGROUNDS:
            raise DataError(f"the shapes dataset's backgrounds must be one of "
                            f"{', '.join(BACKGROUNDS)}, got {self.backgrounds!r}")

    def count(self, split: str) -> int:
        return getattr(self, f"num_{split}")


@dataclasses.dataclass
class Scene:
    image_id: str
    image: np.ndarray  # (size, size, 3) uint8
    objects: list[dict]  # colour, shape, size, box = (ymin, xmin, ymax, xmax) in 0..1
    captions: list[str]
    grounding: list[list[int]]  # per caption, per word: object index or NOT_GROUNDED


@functools.cache  # asked for by every scene
def held_out_pairs(spec: ShapesSpec) -> tuple[tuple[str, str], ...]:
    """Colour-shape pairs seen only in the ``novel`` split."""
    rng = np.random.default_rng([spec.seed, 7])
    colours = rng.permutation(list(COLOURS))[: spec.num_held_out_pairs]
    shapes = rng.permutation(SHAPES)[: spec.num_held_out_pairs]
    return tuple(sorted((str(c), str(s)) for c, s in zip(colours, shapes)))


# ------------------------------------------------------------------------ drawing


def _background(rng, size: int) -> np.ndarray:
    """Low-saturation texture: a tinted base, soft blotches, a lighting gradient, grain."""
    base = rng.uniform(95, 190) + rng.uniform(-14, 14, 3)
    # Mostly brightness, a little colour: objects stay the most saturated thing.
    coarse = (rng.normal(0, 14, (5, 5, 1)) + rng.normal(0, 5, (5, 5, 3))).astype(np.float32)
    blotches = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize(
        (size, size), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = rng.uniform(8, 22) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    fine = rng.normal(0, 5, (size, size, 3))
    return base + blotches + light[..., None] + fine


def _outline(shape: str, box: np.ndarray, scale: float):
    ymin, xmin, ymax, xmax = box * scale
    cy, cx, r = (ymin + ymax) / 2, (xmin + xmax) / 2, (xmax - xmin) / 2
    if shape == "circle":
        return "ellipse", [xmin, ymin, xmax, ymax]
    if shape == "square":
        return "polygon", [(xmin, ymin), (xmax, ymin), (xmax, ymax), (xmin, ymax)]
    if shape == "triangle":
        return "polygon", [(cx, ymin), (xmax, ymax), (xmin, ymax)]
    if shape == "diamond":
        return "polygon", [(cx, ymin), (xmax, cy), (cx, ymax), (xmin, cy)]
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # star: 5 outer, 5 inner points
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return "polygon", [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    """The photographs bundled with jaxcap (``data/samples``), in name order."""
    folder = importlib.resources.files("jaxcap.data") / "samples"
    paths = sorted((p for p in folder.iterdir() if p.name.endswith(".jpg")), key=lambda p: p.name)
    return tuple(np.asarray(Image.open(io.BytesIO(p.read_bytes())).convert("RGB"))
                 for p in paths)


def _photo_background(rng, size: int) -> np.ndarray:
    """A random square crop (35-100% of the shorter side) of a bundled photo, maybe mirrored."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    height, width = photo.shape[:2]
    side = int(rng.uniform(0.35, 1.0) * min(height, width))
    y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(photo[y:y + side, x:x + side]).resize(
        (size, size), Image.Resampling.BICUBIC)
    canvas = np.asarray(crop, np.float32)
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    return canvas + rng.normal(0, 3, canvas.shape)


def _draw(rng, size: int, objects: list[dict], backgrounds: str) -> np.ndarray:
    canvas = _photo_background(rng, size) if backgrounds == "photos" else _background(rng, size)
    supersample = 4
    for obj in objects:
        kind, points = _outline(obj["shape"], np.asarray(obj["box"]), size * supersample)
        # Painted in the object's window only (a pixel of margin round its box): elsewhere
        # the mask is 0 and blending leaves the canvas as it was. The noise is still drawn
        # for the whole image, so the random stream, and every scene, stay as they were.
        box = np.asarray(obj["box"]) * size
        top, left = (max(int(v) - 1, 0) for v in box[:2])
        bottom, right = (min(int(np.ceil(v)) + 1, size) for v in box[2:])
        mask = Image.new("L", ((right - left) * supersample, (bottom - top) * supersample), 0)
        shift = np.asarray([left, top], np.float64) * supersample
        window = ([*(np.asarray(points[:2]) - shift), *(np.asarray(points[2:]) - shift)]
                  if kind == "ellipse" else [tuple(np.asarray(p) - shift) for p in points])
        getattr(ImageDraw.Draw(mask), kind)(window, fill=255)
        alpha = np.asarray(mask.resize((right - left, bottom - top), Image.Resampling.BOX),
                           np.float32)[..., None] / 255
        colour = np.asarray(COLOURS[obj["colour"]], np.float32) * rng.uniform(0.9, 1.05)
        paint = colour + rng.normal(0, 4, (size, size, 3))[top:bottom, left:right]
        region = canvas[top:bottom, left:right]
        canvas[top:bottom, left:right] = region * (1 - alpha) + paint * alpha
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------ scenes


def _place(rng, sizes: list[str]) -> list[np.ndarray] | None:
    """Non-overlapping boxes, with centres apart enough for 'left of' to be clear."""
    boxes: list[np.ndarray] = []
    for size in sizes:
        side = SIZES[size]
        for _ in range(200):
            y, x = rng.uniform(0.04, 0.96 - side, 2)
            box = np.asarray([y, x, y + side, x + side])
            centre = np.asarray([y + side / 2, x + side / 2])
            if all(_gap(box, other) > 0.03 and
                   np.abs(centre - (other[:2] + other[2:]) / 2).max() > 0.12 for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between two boxes along the axis that separates them (negative: overlap)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _pick_objects(rng, split: str, held_out: tuple[tuple[str, str], ...]) -> list[dict]:
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_out]
    count = int(rng.integers(1, 4))
    pairs = [allowed[i] for i in rng.integers(0, len(allowed), count)]
    if split == "novel":
        pairs[int(rng.integers(0, count))] = held_out[int(rng.integers(0, len(held_out)))]
    sizes = [str(rng.choice(list(SIZES))) for _ in range(count)]
    while (boxes := _place(rng, sizes)) is None:
        sizes = ["small"] * count  # three large objects may not fit apart
    objects = [dict(colour=c, shape=s, size=z, box=[float(v) for v in b])
               for (c, s), z, b in zip(pairs, sizes, boxes)]
    return sorted(objects, key=lambda o: o["box"][1] + o["box"][3])  # left to right


# ----------------------------------------------------------------------- captions
# A template turns the objects (sorted left to right) into a list of
# (word, object index) pairs; NOT_GROUNDED marks words that name no single object.


def _np(index: int, obj: dict, size: bool = False) -> list[tuple[str, int]]:
    """'a small red circle', 'an orange star'."""
    words = [(obj["size"], index)] if size else []
    words += [(obj["colour"], index), (obj["shape"], index)]
    article = "an" if words[0][0][0] in "aeiou" else "a"
    return [(article, NOT_GROUNDED)] + words


def _plain(*words: str) -> list[tuple[str, int]]:
    return [(w, NOT_GROUNDED) for w in " ".join(words).split()]


def _position(obj: dict) -> str:
    centre = (obj["box"][1] + obj["box"][3]) / 2
    return "on the left" if centre < 0.38 else "on the right" if centre > 0.62 else "in the middle"


def _vertical(objects: list[dict]) -> tuple[int, int] | None:
    """(top, second) object indices when the top object is clearly above all others."""
    middle = [(o["box"][0] + o["box"][2]) / 2 for o in objects]
    order = sorted(range(len(objects)), key=lambda i: middle[i])
    if middle[order[1]] - middle[order[0]] < 0.15:
        return None
    return order[0], order[1]


def _counts(objects: list[dict]) -> list[tuple[str, int]]:
    """'two squares and a circle': shapes with how many of each."""
    by_shape: dict[str, list[int]] = {}
    for i, obj in enumerate(objects):
        by_shape.setdefault(obj["shape"], []).append(i)
    parts = []
    for shape, members in by_shape.items():
        if len(members) == 1:
            parts.append(_plain("a") + [(shape, members[0])])
        else:
            parts.append(_plain(NUMBERS[len(members)], PLURALS[shape]))
    words = parts[0]
    for part in parts[1:]:
        words = words + _plain("and") + part
    return words


def _templates(objects: list[dict], backgrounds: str) -> list[list[tuple[str, int]]]:
    o = objects
    background = BACKGROUNDS[backgrounds]
    if len(o) == 1:
        return [
            _np(0, o[0], size=True),
            _np(0, o[0]),
            _plain("there is") + _np(0, o[0]) + _plain("in the picture"),
            _plain("one") + _np(0, o[0], size=True)[1:] + _plain(background),
            _np(0, o[0]) + _plain(_position(o[0])),
            _plain("a single") + _np(0, o[0], size=True)[1:],
        ]
    vertical = _vertical(o)
    if len(o) == 2:
        top, _ = vertical or (None, None)
        return [
            _np(0, o[0]) + _plain("to the left of") + _np(1, o[1]),
            _np(1, o[1]) + _plain("to the right of") + _np(0, o[0]),
            _np(0, o[0], size=True) + _plain("and") + _np(1, o[1], size=True),
            _plain("two shapes") + _np(0, o[0]) + _plain("and") + _np(1, o[1]),
            (_np(top, o[top]) + _plain("above") + _np(1 - top, o[1 - top]) if vertical
             else _np(1, o[1], size=True) + _plain("next to") + _np(0, o[0], size=True)),
            _counts(o) + _plain(background),
        ]
    if vertical:
        top, _ = vertical
        first, second = [i for i in range(3) if i != top]
        sixth = (_np(top, o[top], size=True) + _plain("above") + _np(first, o[first])
                 + _plain("and") + _np(second, o[second]))
    else:
        sixth = (_np(2, o[2], size=True) + _plain("next to") + _np(1, o[1], size=True)
                 + _plain("and") + _np(0, o[0]))
    return [
        _np(0, o[0]) + _np(1, o[1]) + _plain("and") + _np(2, o[2]),
        _plain("three shapes") + _np(0, o[0]) + _np(1, o[1]) + _plain("and") + _np(2, o[2]),
        _np(1, o[1]) + _plain("between") + _np(0, o[0]) + _plain("and") + _np(2, o[2]),
        _np(0, o[0]) + _plain("to the left of") + _np(1, o[1]) + _plain("and") + _np(2, o[2]),
        _plain("three shapes") + _counts(o),
        sixth,
    ]


def _captions(rng, objects: list[dict], count: int, backgrounds: str
              ) -> tuple[list[str], list[list[int]]]:
    templates = _templates(objects, backgrounds)
    chosen = rng.permutation(len(templates))[:count]
    captions = [" ".join(w for w, _ in templates[i]) for i in chosen]
    grounding = [[g for _, g in templates[i]] for i in chosen]
    return captions, grounding


def scene(spec: ShapesSpec, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of the spec. Both kinds of background
    give the same objects and the same caption templates (drawn before the background)."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    objects = _pick_objects(rng, split, held_out_pairs(spec))
    captions, grounding = _captions(rng, objects, spec.captions_per_image, spec.backgrounds)
    image = _draw(rng, spec.image_size, objects, spec.backgrounds)
    return Scene(f"shapes_{split}_{index:06d}.jpg", image, objects, captions, grounding)


def scenes(spec: ShapesSpec, split: str, threads: int | None = None, ahead: int = 256):
    """The scenes of ``split`` in index order. Each is a pure function of its index, so
    ``threads`` (default: one per core) draw them side by side (PIL and numpy release the
    GIL while they draw), up to ``ahead`` scenes ahead of the reader."""
    return _in_order(functools.partial(scene, spec, split), spec.count(split), threads, ahead)


def encoded_scenes(spec: ShapesSpec, split: str, threads: int | None = None, ahead: int = 256):
    """``(scene, its JPEG file)`` for the scenes of ``split`` in index order, as ``scenes``
    (the encoding is done by the drawing threads, off the reader's)."""
    def draw(index: int) -> tuple[Scene, bytes]:
        drawn = scene(spec, split, index)
        return drawn, encode_jpeg(drawn.image)
    return _in_order(draw, spec.count(split), threads, ahead)


def _in_order(draw, count: int, threads: int | None, ahead: int):
    threads = threads or os.cpu_count() or 1
    if threads <= 1:
        yield from map(draw, range(count))
        return
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        try:
            for index in range(count):
                pending.append(pool.submit(draw, index))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a reader that stops early does not wait for the scenes drawn ahead
            for future in pending:
                future.cancel()


def encode_jpeg(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=92)
    return out.getvalue()


def export_flickr8k_layout(spec: ShapesSpec, root: str | Path) -> Path:
    """Writes the dataset in the official Flickr8k layout, with a list of the ``novel`` split
    beside the others and each image's objects in ``objects.json`` (which the readers take
    up, so that grounded metrics work on the dataset read as Flickr8k)."""
    root = Path(root)
    images = root / OFFICIAL_IMAGE_DIRS[0]
    images.mkdir(parents=True, exist_ok=True)
    split_files = dict(OFFICIAL_SPLIT_FILES, novel="Flickr_8k.novelImages.txt")
    tokens, lists, objects = [], {split: [] for split in SPLITS}, {}
    for split in SPLITS:
        for item, jpeg in encoded_scenes(spec, split):
            (images / item.image_id).write_bytes(jpeg)
            tokens += [f"{item.image_id}#{k}\t{c}" for k, c in enumerate(item.captions)]
            lists[split].append(item.image_id)
            objects[item.image_id] = item.objects
    (root / OFFICIAL_TOKEN_FILE).write_text("\n".join(tokens) + "\n", encoding="utf8")
    for split, names in lists.items():
        (root / split_files[split]).write_text("".join(f"{n}\n" for n in names), encoding="utf8")
    (root / OBJECTS_FILE).write_text(json.dumps(objects), encoding="utf8")
    return root
