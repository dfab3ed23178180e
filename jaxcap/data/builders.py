"""TFDS builders: every captioning dataset in one schema, as array_record files.

No TensorFlow is needed: builders write ``array_record`` and are read back
with ``tfds.data_source`` (random access, what grain wants). All datasets share
``caption_features()``, so nothing downstream can tell Flickr8k from COCO from
``shapes``:

* ``image``: the image file's bytes as uint8 (decoded by ``jaxcap.data.images``,
  the one place that handles every kind of file);
* ``image_id``: the file name (the key of ``jaxcap extract``'s ``ids.txt``);
* ``captions``: the raw reference captions;
* ``objects``: boxes (ymin, xmin, ymax, xmax in 0..1), colour, shape, size;
  empty for datasets without grounding;
* ``grounding``: (captions, words) int32, the object each word names, -1 for
  none, -2 past the end of a caption; (0, 0) without grounding.

Datasets by name (``DATASETS``): ``flickr8k`` (manual dir in any layout that
``jaxcap.data.readers`` knows, or the official archives when the machine has
internet), ``flickr30k`` and ``coco`` (Karpathy JSON + images), ``shapes``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxcap.data import readers, shapes
from jaxcap.data.images import ImageError, load_image

FILE_FORMAT = "array_record"
GROUNDING_PAD = -2

# The official Flickr8k archives, as mirrored by the University of Illinois form's
# most-used copy (Jason Brownlee's GitHub release).
FLICKR8K_ARCHIVES = {
    "images": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
    "text": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
}


def caption_features() -> tfds.features.FeaturesDict:
    text_list = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
        "image_id": tfds.features.Text(),
        "captions": text_list,
        "objects": tfds.features.FeaturesDict({
            "box": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "colour": text_list, "shape": text_list, "size": text_list,
        }),
        "grounding": tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding="zlib"),
    })


def _record(image_bytes: bytes, image_id: str, captions: list[str],
            objects: list[dict] = (), grounding: list[list[int]] = ()) -> dict:
    width = max((len(g) for g in grounding), default=0)
    padded = np.full((len(grounding), width), GROUNDING_PAD, np.int32)
    for row, words in enumerate(grounding):
        padded[row, : len(words)] = words
    return {
        "image": np.frombuffer(image_bytes, np.uint8),
        "image_id": image_id,
        "captions": list(captions),
        "objects": {"box": np.asarray([o["box"] for o in objects], np.float32).reshape(-1, 4),
                    "colour": [o["colour"] for o in objects],
                    "shape": [o["shape"] for o in objects],
                    "size": [o["size"] for o in objects]},
        "grounding": padded,
    }


class _CaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared schema and the read-check-write of image files."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, strict: bool = True, split_seed: int = 0, **kwargs):
        self.strict = strict
        self.split_seed = split_seed
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=caption_features(),
                                     metadata=tfds.core.MetadataDict(),
                                     description=self.__doc__)

    def _from_reader(self, result: readers.ReadResult):
        """Split generators for a reader's result; unreadable images are data mistakes."""
        self.info.metadata.update(layout=result.layout, split_seed=result.split_seed,
                                  dropped=dict(result.dropped), skipped=dict(result.skipped))
        if result.split_seed is not None:
            self.info.metadata["drawn_split"] = {
                split: [e.image_id for e in examples] for split, examples in result.splits.items()}
        for line in result.warnings():
            print(f"{self.name}: {line}", file=sys.stderr)
        return {split: self._generate_examples(examples)
                for split, examples in result.splits.items() if examples}

    def _generate_examples(self, examples: list[readers.Example]):
        def check(example):
            try:
                data = example.path.read_bytes()
                load_image(data, 32)  # JPEG draft mode makes this a cheap full decode
                return example, data, None
            except (OSError, ImageError) as error:
                return example, None, str(error)

        unreadable = 0
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for example, data, error in pool.map(check, examples):
                if error is not None:
                    if self.strict:
                        raise readers.DataError(f"{example.path}: unusable image ({error}) "
                                                "(use lenient mode to skip such entries)")
                    unreadable += 1
                    continue
                yield example.image_id, _record(data, example.image_id, example.captions,
                                                example.objects)
        if unreadable:
            print(f"{self.name}: skipped {unreadable} unusable images (lenient mode)", file=sys.stderr)


class Flickr8k(_CaptionBuilder, skip_registration=True):
    """Flickr8k: 8,091 images with 5 captions each; splits 6000/1000/1000."""

    name = "flickr8k"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put Flickr8k in --manual-dir in any of these layouts: official "
        "(Flicker8k_Dataset/, Flickr8k.token.txt, Flickr_8k.*Images.txt), Kaggle (Images/, "
        "captions.txt) or Karpathy (dataset_flickr8k.json beside the images). With an empty "
        "manual dir and internet, the official archives are downloaded.")

    def _split_generators(self, dl_manager):
        try:
            root = Path(dl_manager.manual_dir)
        except AssertionError:  # TFDS's way of saying the manual dir is absent or empty
            archives = dl_manager.download(FLICKR8K_ARCHIVES)
            root = Path(os.fspath(dl_manager.download_dir)) / "flickr8k_official"
            for archive in archives.values():
                _extract_zip(Path(os.fspath(archive)), root)
        return self._from_reader(readers.read(root, strict=self.strict, seed=self.split_seed))


def _extract_zip(archive: Path, target: Path) -> None:
    """Extracts ``archive`` into ``target`` (TFDS's extractor needs TensorFlow).

    Members that would land outside ``target`` are refused; a finished
    extraction leaves a marker, so an interrupted one is redone.
    """
    marker = target / f".{archive.name}.extracted"
    if marker.exists():
        return
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.namelist():
            if not (target / member).resolve().is_relative_to(target.resolve()):
                raise readers.DataError(f"{archive}: member {member!r} escapes the folder")
        bundle.extractall(target)
    marker.touch()


class KarpathyCaptions(_CaptionBuilder, skip_registration=True):
    """Karpathy's splits of Flickr8k, Flickr30k and COCO (``restval`` folded into train)."""

    name = "karpathy_captions"
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"dataset_{name}.json")
                       for name in readers.KARPATHY_FILES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put dataset_{flickr8k,flickr30k,coco}.json in --manual-dir with the images beside it "
        "(Flicker8k_Dataset/, flickr30k-images/, or COCO's train2014/ and val2014/).")

    def _split_generators(self, dl_manager):
        result = readers.read(Path(dl_manager.manual_dir), "karpathy", strict=self.strict,
                              dataset=self.builder_config.name)
        return self._from_reader(result)


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    spec: shapes.ShapesSpec = shapes.ShapesSpec()


def shapes_config(spec: shapes.ShapesSpec) -> ShapesConfig:
    """A config whose name encodes the spec, so that each spec has its own directory."""
    default = shapes.ShapesSpec()
    changed = [f"{f.name}{getattr(spec, f.name)}" for f in dataclasses.fields(spec)
               if getattr(spec, f.name) != getattr(default, f.name)]
    return ShapesConfig(name="_".join(changed) or "default", spec=spec,
                        description=f"shapes with {spec}")


class Shapes(_CaptionBuilder, skip_registration=True):
    """Synthetic grounded scenes of coloured shapes (jaxcap.data.shapes)."""

    name = "shapes"
    BUILDER_CONFIGS = [shapes_config(shapes.ShapesSpec())]

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to fetch
        spec = self.builder_config.spec
        self.info.metadata.update(spec=dataclasses.asdict(spec),
                                  held_out_pairs=shapes.held_out_pairs(spec))
        return {split: self._generate_scenes(spec, split) for split in shapes.SPLITS
                if spec.count(split)}

    def _generate_scenes(self, spec, split):
        for scene, jpeg in shapes.encoded_scenes(spec, split):
            yield scene.image_id, _record(jpeg, scene.image_id,
                                          scene.captions, scene.objects, scene.grounding)


DATASETS = {  # name -> (builder class, builder config name)
    "flickr8k": (Flickr8k, None),
    "flickr30k": (KarpathyCaptions, "flickr30k"),
    "coco": (KarpathyCaptions, "coco"),
    "shapes": (Shapes, None),
}


def builder(dataset: str, data_dir: str | os.PathLike, *, spec: shapes.ShapesSpec | None = None,
            strict: bool = True, split_seed: int = 0) -> tfds.core.DatasetBuilder:
    """The builder of ``dataset`` writing under ``data_dir`` (absolute)."""
    if dataset not in DATASETS:
        raise readers.DataError(f"unknown dataset {dataset!r}; known: {sorted(DATASETS)}")
    cls, config = DATASETS[dataset]
    if dataset == "shapes" and spec not in (None, shapes.ShapesSpec()):
        config = shapes_config(spec)  # the default spec is the registered config "default"
    return cls(data_dir=str(Path(data_dir).absolute()), config=config, strict=strict,
               split_seed=split_seed)


def prepare(dataset: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
            **kwargs) -> tfds.core.DatasetBuilder:
    """Builds ``dataset`` once (a built dataset is reused) and returns its builder."""
    built = builder(dataset, data_dir, **kwargs)
    if manual_dir:
        manual_dir = Path(manual_dir).expanduser().absolute()
        # A typo, not a wish to download (an empty folder is that); once built, the
        # dataset no longer reads it.
        if not manual_dir.is_dir() and not built.is_prepared():
            raise readers.DataError(f"{manual_dir}: the manual dir (--manual-dir, "
                                    f"dataset.manual_dir) is not a directory")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    built.download_and_prepare(download_config=config)
    return built


def split_sizes(built: tfds.core.DatasetBuilder) -> dict[str, int]:
    return {name: split.num_examples for name, split in built.info.splits.items()}


def main(args) -> int:
    """``jaxcap prepare``: see ``jaxcap.cli``."""
    spec = shapes.ShapesSpec(**{k: v for k, v in vars(args).items()
                               if k in {f.name for f in dataclasses.fields(shapes.ShapesSpec)}
                               and v is not None})
    if args.export_flickr8k:
        if args.dataset != "shapes":
            raise readers.DataError("--export-flickr8k writes the shapes dataset only")
        root = shapes.export_flickr8k_layout(spec, Path(args.export_flickr8k).expanduser())
        print(f"shapes ({spec.backgrounds} backgrounds) in the Flickr8k layout in {root}")
        return 0
    built = prepare(args.dataset, args.data_dir, args.manual_dir, spec=spec,
                    strict=not args.lenient, split_seed=args.split_seed)
    sizes = split_sizes(built)
    print(f"{args.dataset} in {built.data_dir}")
    for split in ("train", "val", "test", "novel"):
        if split in sizes:
            print(f"  {split:6s} {sizes[split]:7d} images")
    return 0
