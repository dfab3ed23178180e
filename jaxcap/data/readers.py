"""Readers for captioning datasets in the layouts people actually have.

Each reader yields ``Example`` records (image id, image path, split, raw
captions) grouped by split; builders write them, the pipeline batches them.

Layouts:

* ``official`` Flickr8k: ``Flicker8k_Dataset/`` (sic) of JPEGs,
  ``Flickr8k.token.txt`` (``IMAGE.jpg#N<TAB>caption``) and the split lists
  ``Flickr_8k.{train,dev,test}Images.txt`` (6000/1000/1000).
* ``kaggle`` Flickr8k: ``Images/`` and ``captions.txt`` (CSV, header
  ``image,caption``). Splits come from the official lists when they are
  present, else from a seeded 6000/1000/rest split that is returned for the
  caller to record.
* ``karpathy``: ``dataset_flickr8k.json``, ``dataset_flickr30k.json`` or
  ``dataset_coco.json`` (``images[].filename``, ``.filepath`` for COCO,
  ``.split`` with ``restval`` folded into train, ``.sentences[].raw``).

Any layout may carry ``objects.json`` beside its captions: the objects each
image shows, for grounded evaluation (content accuracy, object precision and
recall, attention correctness): ``{"IMAGE.jpg": [{"colour": "red", "shape":
"circle", "size": "small", "box": [ymin, xmin, ymax, xmax]}, ...], ...}``,
boxes in 0..1 of the image (``jaxcap prepare shapes --export-flickr8k`` writes
one). With it, every image of the dataset needs its entry.

Data mistakes (malformed lines, bytes that are not UTF-8, duplicate ids, split
lists naming unknown images, missing image files, JSON of the wrong shape) are
a ``DataError`` naming the file and line in strict mode, or skipped and
counted in lenient mode. Captions whose image is not in the folder (such as
the stray key ``2258277193_586949ec62.jpg.1`` of the official token file) and
images without captions are dropped in both modes, with a warning that counts
them.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np

from jaxcap.errors import UserError

SPLITS = ("train", "val", "test")
OFFICIAL_TOKEN_FILE = "Flickr8k.token.txt"
OFFICIAL_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
OFFICIAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")
KAGGLE_CAPTIONS = "captions.txt"
KAGGLE_IMAGE_DIR = "Images"
OBJECTS_FILE = "objects.json"
KARPATHY_FILES = {"flickr8k": "dataset_flickr8k.json", "flickr30k": "dataset_flickr30k.json",
                  "coco": "dataset_coco.json"}
KARPATHY_IMAGE_DIRS = {"flickr8k": OFFICIAL_IMAGE_DIRS + (KAGGLE_IMAGE_DIR,),
                       "flickr30k": ("flickr30k-images", "flickr30k_images", "Images"),
                       "coco": ("", "images")}
LAYOUTS = ("official", "kaggle", "karpathy")


class DataError(UserError):
    """A mistake in a user's data; the message names the file and line."""


@dataclasses.dataclass
class Example:
    image_id: str
    path: Path
    split: str
    captions: list[str]
    objects: list[dict] = dataclasses.field(default_factory=list)  # from objects.json


@dataclasses.dataclass
class ReadResult:
    splits: dict[str, list[Example]]
    layout: str
    skipped: collections.Counter  # lenient mode: data mistakes skipped, by kind
    dropped: collections.Counter  # both modes: captions without images, images without captions
    split_seed: int | None = None  # set when the split was drawn, not read

    def sizes(self) -> dict[str, int]:
        return {split: len(examples) for split, examples in self.splits.items()}

    def warnings(self) -> list[str]:
        lines = [f"dropped {n} {kind}" for kind, n in sorted(self.dropped.items())]
        lines += [f"skipped {n} {kind} (lenient mode)" for kind, n in sorted(self.skipped.items())]
        return lines


class _Problems:
    """Strict: the first data mistake raises. Lenient: each is counted and skipped."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped: collections.Counter = collections.Counter()

    def __call__(self, where: str, message: str, kind: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {message} (use lenient mode to skip such entries)")
        self.skipped[kind] += 1


def _find(root: Path, name: str, depth: int = 2) -> Path | None:
    """``root/name`` or the same name up to ``depth`` folders below (archives nest)."""
    for level in range(depth + 1):
        for path in sorted(root.glob("/".join(["*"] * level + [name]))):
            return path
    return None


def _lines(path: Path, problems: _Problems):
    """(line number, text) of a UTF-8 text file; bad bytes are a problem of that line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            yield number, raw.decode("utf8").strip("\ufeff")
        except UnicodeDecodeError as error:
            problems(f"{path}:{number}", f"not UTF-8 text (byte {error.start})", "non-UTF-8 lines")


def _image_files(folder: Path) -> dict[str, Path]:
    try:
        files = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    except OSError as error:
        raise DataError(f"{folder}: cannot read the image folder ({error.strerror})") from None
    if not files:
        raise DataError(f"{folder}: the image folder is empty")
    return files


def detect_layout(root: Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such directory")
    if _find(root, OFFICIAL_TOKEN_FILE):
        return "official"
    if _find(root, KAGGLE_CAPTIONS):
        return "kaggle"
    if any(_find(root, name) for name in KARPATHY_FILES.values()):
        return "karpathy"
    raise DataError(f"{root}: no {OFFICIAL_TOKEN_FILE}, {KAGGLE_CAPTIONS} or Karpathy "
                    f"dataset_*.json found; see 'jaxcap prepare --help' for the layouts")


def _assemble(captions: dict[str, list[str]], images: dict[str, Path],
              split_of: dict[str, str], dropped: collections.Counter) -> dict[str, list[Example]]:
    """Joins captions, files and splits; drops and counts what has no partner."""
    without_image = [name for name in captions if name not in images]
    dropped["captions without an image"] += sum(len(captions[n]) for n in without_image)
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for name in sorted(split_of):
        if name not in captions:
            dropped["images without captions"] += 1
            continue
        splits[split_of[name]].append(Example(name, images[name], split_of[name], captions[name]))
    return splits


def _read_split_lists(root: Path, images: dict[str, Path], problems: _Problems
                      ) -> dict[str, str] | None:
    found = {split: _find(root, name) for split, name in OFFICIAL_SPLIT_FILES.items()}
    if not any(found.values()):
        return None
    split_of: dict[str, str] = {}
    for split, path in found.items():
        if path is None:
            raise DataError(f"{root}: {OFFICIAL_SPLIT_FILES[split]} is missing beside the other "
                            "split lists")
        for number, line in _lines(path, problems):
            name = line.strip()
            if not name:
                continue
            if name not in images:
                problems(f"{path}:{number}", f"names unknown image {name!r}",
                         "split entries naming unknown images")
            elif name in split_of:
                problems(f"{path}:{number}", f"{name!r} is listed twice (also in "
                         f"{split_of[name]})", "duplicate split entries")
            else:
                split_of[name] = split
    return split_of


def draw_split(names: list[str], seed: int) -> dict[str, str]:
    """A seeded 6000/1000/rest split (75%/12.5%/rest below 8000 images)."""
    order = np.random.default_rng(seed).permutation(sorted(names))
    n = len(order)
    n_train, n_val = (6000, 1000) if n >= 8000 else (round(0.75 * n), round(0.125 * n))
    return {str(name): ("train" if i < n_train else "val" if i < n_train + n_val else "test")
            for i, name in enumerate(order)}


def read_official(root: Path, strict: bool = True) -> ReadResult:
    root = Path(root)
    problems = _Problems(strict)
    token_file = _find(root, OFFICIAL_TOKEN_FILE)
    image_dir = next((p for p in (_find(root, d) for d in OFFICIAL_IMAGE_DIRS) if p), None)
    if token_file is None or image_dir is None:
        raise DataError(f"{root}: the official layout needs {OFFICIAL_TOKEN_FILE} and "
                        f"{OFFICIAL_IMAGE_DIRS[0]}/")
    images = _image_files(image_dir)
    captions: dict[str, list[str]] = collections.defaultdict(list)
    seen: dict[str, int] = {}
    for number, line in _lines(token_file, problems):
        if not line.strip():
            continue
        where = f"{token_file}:{number}"
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.strip().rpartition("#")
        if not tab:
            problems(where, "no tab between the key and the caption", "malformed lines")
        elif not hash_sign or not name or not index.isdigit():
            problems(where, f"key {key!r} is not IMAGE#N", "malformed lines")
        elif not caption.strip():
            problems(where, f"empty caption for {key}", "empty captions")
        elif key in seen:
            problems(where, f"duplicate key {key} (first on line {seen[key]})", "duplicate keys")
        else:
            seen[key] = number
            captions[name].append(caption.strip())
    split_of = _read_split_lists(root, images, problems)
    if split_of is None:
        raise DataError(f"{root}: the official layout needs the split lists "
                        f"{', '.join(OFFICIAL_SPLIT_FILES.values())}")
    dropped: collections.Counter = collections.Counter()
    splits = _assemble(captions, images, split_of, dropped)
    return ReadResult(splits, "official", problems.skipped, dropped)


def read_kaggle(root: Path, strict: bool = True, seed: int = 0) -> ReadResult:
    root = Path(root)
    problems = _Problems(strict)
    captions_file = _find(root, KAGGLE_CAPTIONS)
    image_dir = _find(root, KAGGLE_IMAGE_DIR)
    if captions_file is None or image_dir is None:
        raise DataError(f"{root}: the Kaggle layout needs {KAGGLE_CAPTIONS} and "
                        f"{KAGGLE_IMAGE_DIR}/")
    images = _image_files(image_dir)
    captions: dict[str, list[str]] = collections.defaultdict(list)
    seen: dict[tuple[str, str], int] = {}
    header_checked = False
    for number, line in _lines(captions_file, problems):
        if not line.strip():
            continue
        where = f"{captions_file}:{number}"
        row = next(csv.reader(io.StringIO(line)), [])
        if not header_checked:
            if [c.strip().lower() for c in row] != ["image", "caption"]:
                raise DataError(f"{where}: expected the header 'image,caption', found {line!r}")
            header_checked = True
            continue
        if len(row) < 2:
            problems(where, "expected 'image,caption'", "malformed lines")
            continue
        # Unquoted commas inside a caption split it into more fields: join them back.
        name, caption = row[0].strip(), ",".join(row[1:]).strip()
        if not name:
            problems(where, "no image name", "malformed lines")
        elif not caption:
            problems(where, f"empty caption for {name}", "empty captions")
        elif (name, caption) in seen:
            problems(where, f"duplicate of line {seen[name, caption]}", "duplicate captions")
        else:
            seen[name, caption] = number
            captions[name].append(caption)
    split_of = _read_split_lists(root, images, problems)
    drawn_seed = None
    if split_of is None:
        split_of, drawn_seed = draw_split([n for n in captions if n in images], seed), seed
    dropped: collections.Counter = collections.Counter()
    splits = _assemble(captions, images, split_of, dropped)
    return ReadResult(splits, "kaggle", problems.skipped, dropped, drawn_seed)


def _json_error(path: Path, where: str, expected: str) -> DataError:
    return DataError(f"{path}: {where} should be {expected}")


def read_karpathy(root: Path, dataset: str | None = None, strict: bool = True) -> ReadResult:
    """``dataset``: flickr8k, flickr30k or coco; found from the JSON file name if None."""
    root = Path(root)
    problems = _Problems(strict)
    names = [dataset] if dataset else list(KARPATHY_FILES)
    found = [(d, p) for d in names if (p := _find(root, KARPATHY_FILES[d]))]
    if not found:
        raise DataError(f"{root}: no {' or '.join(KARPATHY_FILES[d] for d in names)} found")
    dataset, json_path = found[0]
    data = _read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _json_error(json_path, "the top level", "an object with an 'images' list")
    image_dirs = [root / d for d in KARPATHY_IMAGE_DIRS[dataset]]
    image_dirs += [p for d in KARPATHY_IMAGE_DIRS[dataset] if d and (p := _find(root, d))]
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    dropped: collections.Counter = collections.Counter()
    seen: set[str] = set()
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise _json_error(json_path, where, "an object with a string 'filename'")
        split = {"restval": "train"}.get(entry.get("split"), entry.get("split"))
        if split not in SPLITS:
            raise _json_error(json_path, f"{where}.split", "train, val, test or restval, "
                              f"not {entry.get('split')!r}")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise _json_error(json_path, f"{where}.sentences", "a list")
        texts = []
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            tokens = sentence.get("tokens") if isinstance(sentence, dict) else None
            if isinstance(raw, str) and raw.strip():
                texts.append(raw.strip())
            elif isinstance(tokens, list) and tokens:
                texts.append(" ".join(map(str, tokens)))
            else:
                problems(f"{json_path}: {where}.sentences[{j}]", "has neither 'raw' nor 'tokens'",
                         "empty captions")
        relative = Path(entry.get("filepath") or "") / entry["filename"]
        image_id = relative.as_posix()
        if image_id in seen:
            problems(f"{json_path}: {where}", f"duplicate image {image_id}", "duplicate images")
            continue
        seen.add(image_id)
        path = next((d / relative for d in image_dirs if (d / relative).is_file()), None)
        if path is None:
            problems(f"{json_path}: {where}", f"image file {relative} not found under "
                     f"{root}", "missing image files")
            continue
        if not texts:
            dropped["images without captions"] += 1
            continue
        splits[split].append(Example(image_id, path, split, texts))
    return ReadResult(splits, "karpathy", problems.skipped, dropped)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None


def _object(entry) -> dict | None:
    """One object of ``objects.json`` in the builders' form, or None if it is malformed."""
    if not isinstance(entry, dict):
        return None
    colour, shape, size, box = (entry.get(k) for k in ("colour", "shape", "size", "box"))
    if not (isinstance(colour, str) and isinstance(shape, str) and isinstance(size, (str, type(None)))
            and isinstance(box, list) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        return None
    ymin, xmin, ymax, xmax = (float(v) for v in box)
    if not (0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1):
        return None
    return {"colour": colour, "shape": shape, "size": size or "", "box": [ymin, xmin, ymax, xmax]}


def _attach_objects(result: ReadResult, path: Path, problems: _Problems) -> None:
    """Gives every example its objects from ``path``; an image without a well-formed entry
    is a data mistake (lenient: left out of its split, and counted)."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise _json_error(path, "the top level", "an object keyed by image name")
    known = set()
    for split, examples in result.splits.items():
        kept = []
        for example in examples:
            known.add(example.image_id)
            entry = data.get(example.image_id)
            if entry is None:
                problems(str(path), f"no entry for image {example.image_id}",
                         "images without objects")
                continue
            objects = [_object(o) for o in entry] if isinstance(entry, list) else [None]
            if None in objects:
                problems(f"{path}: {example.image_id!r}", "should be a list of objects with "
                         "string colour and shape, optional string size, and box [ymin, xmin, "
                         "ymax, xmax] within 0..1", "malformed objects")
                continue
            example.objects = objects
            kept.append(example)
        result.splits[split] = kept
    result.skipped.update(problems.skipped)
    if unknown := len(set(data) - known):
        result.dropped["objects of images not in the dataset"] += unknown


def read(root: str | os.PathLike, layout: str | None = None, strict: bool = True,
         seed: int = 0, dataset: str | None = None) -> ReadResult:
    """Reads ``root`` in ``layout`` (detected when None), with its ``objects.json`` if any;
    ``dataset`` chooses the Karpathy file (found from the file name when None)."""
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout == "official":
        result = read_official(root, strict)
    elif layout == "kaggle":
        result = read_kaggle(root, strict, seed)
    elif layout == "karpathy":
        result = read_karpathy(root, dataset, strict)
    else:
        raise DataError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    objects_file = _find(root, OBJECTS_FILE)
    if objects_file is not None:
        _attach_objects(result, objects_file, _Problems(strict))
    return result
