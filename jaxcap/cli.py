"""The ``jaxcap`` command: a thin layer over the modules that do the work.

Each subcommand's module is imported only when it runs, so ``--help`` is quick.
A user's mistake (a bad file, a wrong folder) ends with one ``jaxcap: error:``
line that says what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert ImageNet ResNet weights (Keras HDF5, torchvision) to jaxcap",
        description="Convert a Keras applications HDF5 file or a torchvision ResNet state_dict "
                    "(.safetensors or .pth) into a jaxcap weights directory (Orbax checkpoint "
                    "plus metadata.json naming depth, variant and preprocessing).",
        epilog="examples:\n"
               "  jaxcap convert keras resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5 w/keras\n"
               "  jaxcap convert torchvision resnet50-0676ba61.pth w/tv\n"
               "  jaxcap convert --download torchvision w/tv\n"
               "  jaxcap convert init w/scratch --depth 18   (random weights, to train from scratch)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="ARG",
                        help="SOURCE WEIGHTS OUT_DIR; OUT_DIR with --download; init OUT_DIR")
    parser.add_argument("--download", choices=("keras", "torchvision"),
                        help="fetch the official ResNet-50 file of this source (checksum pinned)")
    parser.add_argument("--mirror", metavar="URL",
                        help="with --download: fetch from this address instead; the pin still applies")
    parser.add_argument("--cache-dir", help="with --download: where the file is kept "
                                            "(default ~/.cache/jaxcap/weights)")
    parser.add_argument("--depth", type=int, default=50, help="with init: 18, 34, 50, 101 or 152")
    parser.add_argument("--variant", default="v1.5", help="with init: v1 (Keras) or v1.5 (torchvision)")
    parser.add_argument("--seed", type=int, default=0, help="with init: random seed")
    parser.set_defaults(module="jaxcap.convert")


def _add_extract(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract", help="turn images into spatial feature grids (features.npy + ids.txt)",
        description="Run a converted ResNet over a folder (or a list file) of images and write "
                    "FEAT_DIR/features.npy (N, H, W, C), FEAT_DIR/ids.txt and "
                    "FEAT_DIR/skipped.tsv. Interrupted, it resumes when rerun with the same "
                    "arguments.")
    parser.add_argument("--weights", required=True, help="directory written by 'jaxcap convert'")
    parser.add_argument("--images", required=True,
                        help="a folder of images, or a text file with one image path per line")
    parser.add_argument("--out", required=True, help="output folder FEAT_DIR")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per step, rounded up to a multiple of the device count")
    parser.add_argument("--image-size", type=int, default=224, help="square input side")
    parser.add_argument("--grid", type=int, default=None,
                        help="average-pool the feature map to GRID x GRID (e.g. 14 at 448 input)")
    parser.add_argument("--stage", type=int, default=4, choices=(1, 2, 3, 4),
                        help="ResNet stage whose output is the feature grid")
    parser.add_argument("--resize", choices=("direct", "center_crop"), default="direct",
                        help="squash to the square (default) or shorter side then centre crop")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="stored feature type")
    parser.add_argument("--workers", type=int, default=None, help="image decoding threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(module="jaxcap.extract")


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare", help="build a captioning dataset (TFDS array_record) and print its splits",
        description="Build DATASET under --data-dir with tensorflow-datasets (array_record "
                    "files, no TensorFlow), read back later with tfds.data_source. Flickr8k "
                    "reads --manual-dir in the official, Kaggle or Karpathy layout; flickr30k and "
                    "coco read Karpathy's dataset_*.json beside the images; shapes is generated.",
        epilog="examples:\n"
               "  jaxcap prepare flickr8k --manual-dir ~/data/Flickr8k --data-dir ~/tensorflow_datasets\n"
               "  jaxcap prepare coco --manual-dir ~/data/coco --lenient\n"
               "  jaxcap prepare shapes --num-train 20000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("flickr8k", "flickr30k", "coco", "shapes"))
    parser.add_argument("--manual-dir", help="where the downloaded files are")
    parser.add_argument("--data-dir", default=os.path.expanduser("~/tensorflow_datasets"),
                        help="where the built dataset goes (default ~/tensorflow_datasets)")
    parser.add_argument("--lenient", action="store_true",
                        help="skip and count data mistakes instead of stopping at the first")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the drawn split when the data has no split lists")
    shapes = parser.add_argument_group("shapes")
    for name in ("seed", "image_size", "num_train", "num_val", "num_test", "num_novel"):
        shapes.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    parser.set_defaults(module="jaxcap.data.builders")


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a captioner (pmapped Adam, Orbax checkpoints; resumes)",
        description="Train the attention-LSTM captioner described by CONFIG into WORKDIR. "
                    "CONFIG is a built-in name (shapes, flickr8k, coco) or a Python file whose "
                    "get_config() returns an ml_collections.ConfigDict; override any key with "
                    "--config.KEY=VALUE. Rerun the same command to resume.",
        epilog="examples:\n"
               "  jaxcap train --config shapes --workdir runs/shapes\n"
               "  jaxcap train --config flickr8k --workdir runs/f8k "
               "--config.encoder.weights=weights/keras --config.dataset.manual_dir=~/Flickr8k",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes", help="built-in name or config file")
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host TPU pods)")
    parser.set_defaults(module="jaxcap.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcap", description="Image captioning in JAX/Flax: convert ResNet weights, "
                                   "extract image features, train and run captioners.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(subparsers)
    _add_extract(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --config.KEY=VALUE overrides are not argparse options: set them aside first.
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    from jaxcap.configs import ConfigError
    from jaxcap.data.glove import GloveError
    from jaxcap.data.readers import DataError
    from jaxcap.extract import ExtractError
    from jaxcap.models.encoder import WeightsError
    from jaxcap.train import TrainingError

    try:
        return importlib.import_module(args.module).main(args)
    except (WeightsError, ExtractError, DataError, GloveError, ConfigError,
            TrainingError) as error:
        print(f"jaxcap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcap {args.command}: interrupted (extract resumes when rerun with the same arguments)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
