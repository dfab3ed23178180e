"""The ``jaxcap`` command: a thin layer over the modules that do the work.

Each subcommand's module is imported only when it runs, so ``--help`` is quick.
A user's mistake (a bad file, a wrong folder) ends with one ``jaxcap: error:``
line that says what to do, never a traceback.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import platform
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
               "  jaxcap prepare shapes --num-train 20000\n"
               "  jaxcap prepare shapes --backgrounds photos --export-flickr8k ~/data/shapes8k",
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
    shapes.add_argument("--backgrounds", choices=("texture", "photos"),
                        help="synthetic textures (default) or crops of real photos")
    shapes.add_argument("--export-flickr8k", metavar="DIR",
                        help="write the dataset to DIR in the official Flickr8k layout (with "
                             "objects.json) instead of building it, for --config.dataset.name="
                             "flickr8k --config.dataset.manual_dir=DIR")
    parser.set_defaults(module="jaxcap.data.builders")


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a captioner (pmapped Adam, Orbax checkpoints; resumes)",
        description="Train the captioner described by CONFIG into WORKDIR. "
                    "CONFIG is a built-in name (shapes, flickr8k, coco) or a Python file whose "
                    "get_config() returns an ml_collections.ConfigDict; override any key with "
                    "--config.KEY=VALUE. The decoder is --config.decoder.variant=none|soft|hard|"
                    "adaptive|updown|transformer (default soft). Rerun the same command to "
                    "resume.",
        epilog="examples:\n"
               "  jaxcap train --config shapes --workdir runs/shapes\n"
               "  jaxcap train --config shapes --workdir runs/updown "
               "--config.decoder.variant=updown\n"
               "  jaxcap train --config flickr8k --workdir runs/f8k "
               "--config.encoder.weights=weights/keras --config.dataset.manual_dir=~/Flickr8k",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shapes", help="built-in name or config file")
    parser.add_argument("--workdir", required=True, help="the run directory")
    multi = parser.add_argument_group(
        "several processes", "every process runs the same command; config.batch_size is the "
        "global batch, split over all devices of all processes")
    multi.add_argument("--distributed", action="store_true",
                       help="join JAX's distributed runtime first (jax.distributed.initialize); "
                            "without the options below the cluster is detected (Cloud TPU "
                            "pod slices, SLURM, Open MPI)")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address, reachable from every process")
    multi.add_argument("--num-processes", type=int, help="how many processes take part")
    multi.add_argument("--process-id", type=int, help="this process's index, 0 to N-1")
    parser.set_defaults(module="jaxcap.train")


def _add_search_options(parser, beam: int) -> None:
    """The search flags; left out, each takes its default (``jaxcap.caption.search_options``)."""
    search = parser.add_argument_group("search")
    search.add_argument("--beam", type=int, help=f"beam size (1: greedy; default {beam})")
    search.add_argument("--max-length", type=int,
                        help="tokens, <start> and <end> included (default: the run's "
                             "eval.max_length)")
    search.add_argument("--min-length", type=int, help="words before <end> (default 1)")
    search.add_argument("--length-penalty", type=float,
                        help="rank finished beams by score / length**P, the length counting "
                             "the words and <end> (default 0: by summed log-prob); P > 0 "
                             "favours longer captions")
    search.add_argument("--no-repeat-ngram", type=int,
                        help="never repeat an n-gram of this size (default 0: off)")
    search.add_argument("--temperature", type=float,
                        help="> 0: sample captions at this temperature (with --beam 1)")
    search.add_argument("--top-k", type=int, help="sampling: only the k likeliest words")
    search.add_argument("--seed", type=int, help="sampling: random seed (default 0)")
    search.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute in this precision (default: the run's config.dtype); "
                             "parameters are float32 whatever a run trained in")
    parser.set_defaults(default_beam=beam)


def _add_caption(subparsers) -> None:
    parser = subparsers.add_parser(
        "caption", help="caption images with a trained run (JSON lines, attention figures)",
        description="Caption image files (or every file in folders) with the best checkpoint "
                    "of RUN_DIR, its encoder and preprocessing. One JSON line per image: "
                    '{"image", "caption", "score"}; unusable files are reported on stderr '
                    "and skipped.",
        epilog="examples:\n"
               "  jaxcap caption --workdir runs/shapes photos/ --beam 5 --output captions.jsonl\n"
               "  jaxcap caption --workdir runs/shapes cat.jpg --attention-dir attention/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="the run directory of 'jaxcap train'")
    source.add_argument("--exported", help="a folder written by 'jaxcap export' (its search)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--attention-dir", help="write one attention PNG per image here")
    parser.add_argument("--output", help="write the JSON lines to this file (default stdout)")
    _add_search_options(parser, beam=5)
    parser.set_defaults(module="jaxcap.caption")


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a trained run on a split (BLEU, METEOR, ROUGE-L, CIDEr-D)",
        description="Decode SPLIT of the run's dataset with its best checkpoint and score it "
                    "as pycocoevalcap does: BLEU-1..4, METEOR (needs Java), ROUGE-L, CIDEr-D; "
                    "on shapes also content accuracy and attention correctness, on the split "
                    "and on the novel split. Writes RUN_DIR/eval_SPLIT.json and the COCO "
                    "results file RUN_DIR/captions_SPLIT.json.",
        epilog="example:\n  jaxcap evaluate --workdir runs/shapes --split test --beam 3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run directory of 'jaxcap train'")
    parser.add_argument("--split", default="test", help="train, val, test (or novel on shapes)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step")
    parser.add_argument("--no-meteor", action="store_true",
                        help="skip METEOR (its Java process takes about 12 s to start)")
    _add_search_options(parser, beam=3)
    parser.set_defaults(module="jaxcap.evaluate")


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a trained run over HTTP (JSON API, dynamic batching, a web page)",
        description="Serve the best checkpoint of RUN_DIR: POST /v1/captions (multipart field "
                    "'images', repeatable, or one raw image body), GET /v1/model, /healthz, "
                    "/readyz, the API's own documentation at /docs and a page at /. Requests "
                    "are queued and decoded together: up to --max-batch images, or whatever "
                    "arrived within --max-wait-ms. Ready once every bucket of the default "
                    "search is compiled.",
        epilog="example:\n  jaxcap serve --workdir runs/shapes --port 8000 --beam 3\n"
               "  jaxcap serve --exported exported/shapes --port 8000\n"
               "  curl -F images=@cat.jpg -F images=@dog.png http://127.0.0.1:8000/v1/captions",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="the run directory of 'jaxcap train'")
    source.add_argument("--exported", help="a folder written by 'jaxcap export' (its search "
                                           "only)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most images decoded together (rounded up to the device count)")
    parser.add_argument("--max-wait-ms", type=float, default=10,
                        help="how long a batch waits for more requests to fill it")
    parser.add_argument("--max-images", type=int, default=64, help="most images a request")
    parser.add_argument("--max-body-mb", type=float, default=20, help="largest request body")
    parser.add_argument("--queue-images", type=int, default=1024,
                        help="images waiting at most; beyond, 503 with Retry-After")
    parser.add_argument("--timeout-s", type=float, default=30,
                        help="a request not answered in this time gets 504")
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="an image decoding to more pixels gets an error, undecoded "
                             "(read from its header)")
    parser.add_argument("--max-decode-mb", type=float, default=1024,
                        help="memory held by images being decoded at once, over all requests")
    parser.add_argument("--cached-searches", type=int, default=16,
                        help="option sets besides the default whose compiled programs are kept")
    _add_search_options(parser, beam=3)
    parser.set_defaults(module="jaxcap.serve")


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's captioner as one portable artifact (jax.export)",
        description="Export the whole image-to-caption function of RUN_DIR's best checkpoint "
                    "(uint8 pixels -> encoder -> the search -> tokens, scores, attention) as "
                    "StableHLO with a symbolic batch dimension, for every platform asked, with "
                    "its variables, vocabulary and preprocessing and each file's SHA-256. "
                    "jaxcap/exported.py loads it with jax, numpy and pillow alone.",
        epilog="example:\n  jaxcap export --workdir runs/shapes --out exported/shapes "
               "--beam 3 --platforms cpu,cuda,tpu\n"
               "  jaxcap caption --exported exported/shapes cat.jpg",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the run directory of 'jaxcap train'")
    parser.add_argument("--out", required=True, help="a new folder for the artifact")
    parser.add_argument("--platforms", default="cpu",
                        help="comma-separated: cpu, cuda, rocm, tpu (lowered here, no device "
                             "needed)")
    _add_search_options(parser, beam=3)
    parser.set_defaults(module="jaxcap.export")


def _add_migrate(subparsers) -> None:
    parser = subparsers.add_parser(
        "migrate", help="carry a run over a rename of parameters by a newer jaxcap",
        description="Rewrite every checkpoint of RUN (checkpoints/ and best/) whose parameter "
                    "names no longer fit the model its config builds, under the new names: "
                    "the renames jaxcap releases record, then each --rename. Values are copied "
                    "bit for bit (training resumes exactly); nothing is written unless every "
                    "checkpoint then fits; the originals are kept in RUN/before-migration-TIME.",
        epilog="example:\n  jaxcap migrate runs/old --rename '^decoder/lstm/'=decoder/cell/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the run directory of 'jaxcap train'")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="a regular expression over paths like decoder/output/kernel and its "
                             "replacement; repeatable, applied in order")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be renamed, change nothing")
    parser.set_defaults(module="jaxcap.migrate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcap", description="Image captioning in JAX/Flax: convert ResNet weights, "
                                   "extract image features, train and run captioners.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(subparsers)
    _add_extract(subparsers)
    _add_prepare(subparsers)
    _add_train(subparsers)
    _add_caption(subparsers)
    _add_evaluate(subparsers)
    _add_serve(subparsers)
    _add_export(subparsers)
    _add_migrate(subparsers)
    return parser


# glibc's mallopt parameters (malloc.h), and the environment variables that set them too.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
MALLOC_ENVIRONMENT = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                      "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
COMPUTE_COMMANDS = ("train", "evaluate", "caption", "extract")


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep the memory XLA frees for its next use; True if it did.

    By default glibc unmaps every freed block over 32 MiB, trims free memory at the top
    of the heap, and gives whole heaps of the threads' arenas back to the kernel, so the
    buffers XLA allocates at every step come back as fresh pages, each first touch a
    page fault: 3.9 M minor faults and 11.5 s in the kernel in 120 training steps of the
    shapes default. One arena that never unmaps or trims: 0.8 M and 3.9 s, with a lower
    peak resident size (experiments/README.md). Called before XLA starts its threads;
    left to the user where any MALLOC_* setting is given in the environment.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(
            name in os.environ for name in MALLOC_ENVIRONMENT):
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return all(mallopt(param, value) == 1 for param, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**28)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --config.KEY=VALUE overrides are not argparse options: set them aside first.
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    args.overrides = overrides
    if args.command in COMPUTE_COMMANDS:
        keep_freed_memory()
    from jaxcap.errors import UserError

    try:
        return importlib.import_module(args.module).main(args)
    except UserError as error:
        print(f"jaxcap {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxcap {args.command}: interrupted (extract resumes when rerun with the same arguments)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
