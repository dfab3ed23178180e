"""Examples/s of the input pipeline at batch 32, against how fast training consumes them.

* image pipeline: a Flickr8k-layout dataset of real photos (scikit-image's,
  at Flickr's typical 500x375, JPEG) built through TFDS, read with grain,
  decoded and resized to 224x224 (what end-to-end training reads);
* feature pipeline: the same examples joined by image id with a memory-mapped
  7x7x2048 float32 ``features.npy`` (what training on cached features reads);
* consumption: jaxcap's train step on cached features (the training
  benchmark's workload), and the ResNet-50 forward pass at 224 (the least an
  end-to-end step costs per image).

    python benchmarks/input_bench.py [--images 256] [--repetitions 3]

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import extract_bench, train_bench  # noqa: E402
from benchmarks.common import best_seconds, machine  # noqa: E402
from jaxcap.data import builders  # noqa: E402
from jaxcap.data.pipeline import Batcher, FeatureStore, PipelineOptions  # noqa: E402
from jaxcap.data.text import Vocabulary  # noqa: E402

BATCH = 32


def flickr_like(root: Path, count: int) -> Path:
    """An official-layout Flickr8k of ``count`` real photos cropped to 500x375."""
    import skimage.data

    photos = [Image.open(os.path.join(skimage.data.data_dir, name)).convert("RGB").resize(
        (666, 500)) for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:010d}_bench.jpg" for i in range(count)]
    for i, name in enumerate(names):
        x, y = rng.integers(0, 166), rng.integers(0, 125)
        photos[i % 4].crop((x, y, x + 500, y + 375)).save(images / name, quality=90)
    (root / "Flickr8k.token.txt").write_text("".join(
        f"{n}#{k}\ta photo number {i} with caption {k}\n" for i, n in enumerate(names)
        for k in range(5)))
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("")
    (root / "Flickr_8k.testImages.txt").write_text("")
    return root


def examples_per_s(batcher: Batcher, repetitions: int) -> float:
    def run():
        for _ in batcher.epoch(0):
            pass
    return batcher.num_batches() * BATCH / best_seconds(run, repetitions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        built = builders.prepare("flickr8k", tmp / "data", flickr_like(tmp / "raw", args.images))
        source = built.as_data_source("train")
        vocabulary = Vocabulary.build(["a photo number with caption"] * 5, min_count=1)
        options = PipelineOptions(batch_size=BATCH, max_length=22, image_size=224,
                                  drop_remainder=True, num_threads=os.cpu_count() or 2)
        images = examples_per_s(Batcher(source, vocabulary, options), args.repetitions)
        features_dir = tmp / "features"
        features_dir.mkdir()
        names = [f"{i:010d}_bench.jpg" for i in range(args.images)]
        rows = np.lib.format.open_memmap(features_dir / "features.npy", mode="w+",
                                         dtype=np.float32, shape=(args.images, 7, 7, 2048))
        rows[:] = np.random.default_rng(0).standard_normal(rows.shape, np.float32)
        rows.flush()
        (features_dir / "ids.txt").write_text("\n".join(names) + "\n")
        features = examples_per_s(Batcher(source, vocabulary, options,
                                          FeatureStore(features_dir)), args.repetitions)
    training = BATCH * 10 / best_seconds(train_bench.jaxcap_run(train_bench.batches(10)),
                                         args.repetitions)
    encoder = BATCH / best_seconds(extract_bench.jaxcap_run(BATCH)[0], args.repetitions)
    figures = dict(
        image_pipeline_examples_per_s=round(images, 1),
        feature_pipeline_examples_per_s=round(features, 1),
        training_on_features_captions_per_s=round(training, 1),
        resnet50_forward_images_per_s=round(encoder, 1),
        feature_pipeline_headroom=round(features / training, 2),
        image_pipeline_headroom=round(images / encoder, 2),
        batch_size=BATCH, images=args.images, **info)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
