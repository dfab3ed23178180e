"""Converting published ImageNet ResNet weights into jaxcap weights directories.

Sources:

* ``keras``: the Keras applications HDF5 file (legacy layout: a ``layer_names``
  attribute, each layer group's ``weight_names``, datasets at
  ``LAYER/LAYER/kernel:0``; Keras 3's legacy writer drops the ``:0``). Read with
  h5py alone. Gives the ``v1`` network with caffe preprocessing.
* ``torchvision``: a ResNet ``state_dict`` as ``.safetensors`` (no torch needed)
  or ``.pth`` (torch imported only then, with ``weights_only=True``). Gives the
  ``v1.5`` network with torch preprocessing.

Every tensor is accounted for: unknown, missing or mis-shaped tensors are one
error naming each of them, and nothing is written then. The classification head
(Keras ``predictions``, torchvision ``fc``) is known and dropped: jaxcap's
encoder is headless.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

import h5py
import jax
import numpy as np

from jaxcap.models.encoder import WeightsError, abstract_variables, build_encoder, save_encoder
from jaxcap.models.resnet import STAGE_SIZES

SOURCES = ("keras", "torchvision")
SOURCE_FORMAT = {  # source -> (variant, preprocessing)
    "keras": ("v1", "caffe"),
    "torchvision": ("v1.5", "torch"),
}

# The official ResNet-50 files. torchvision's digest is the file's SHA-256 (its
# name carries the first 8 hex digits). Keras publishes only an MD5 for this
# file, so that is the pin there; the SHA-256 of whatever is downloaded is
# recorded in the metadata either way.
OFFICIAL_WEIGHTS = {
    "keras": dict(
        url="https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        algorithm="md5", digest="4d473c1dd8becc155b73f8504c6f6626"),
    "torchvision": dict(
        url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
        algorithm="sha256",
        digest="0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a"),
}

_BN_KERAS = {"gamma": ("params", "scale"), "beta": ("params", "bias"),
             "moving_mean": ("batch_stats", "mean"), "moving_variance": ("batch_stats", "var")}
_BN_TORCH = {"weight": ("params", "scale"), "bias": ("params", "bias"),
             "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- keras


def _decode(names) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def read_keras_h5(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All weights of a legacy-layout Keras HDF5 file as ``{'layer/weight': array}``."""
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise WeightsError(f"{path}: not an HDF5 file ({error})") from None
    with handle:
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in root.attrs:
            raise WeightsError(f"{path}: no 'layer_names' attribute; not a Keras legacy "
                               "HDF5 weights file")
        tensors = {}
        for layer in _decode(root.attrs["layer_names"]):
            group = root[layer]
            for weight_name in _decode(group.attrs.get("weight_names", [])):
                # 'conv1_conv/kernel:0' (Keras 2) or 'conv1_conv/kernel' (Keras 3).
                weight = weight_name.split("/")[-1].removesuffix(":0")
                tensors[f"{layer}/{weight}"] = np.asarray(group[weight_name])
    return tensors


_KERAS_NAME = re.compile(r"^conv([2-5])_block(\d+)_([0-3])_(conv|bn)$")


def _locate_keras(name: str):
    """'conv3_block2_1_bn/gamma' -> (2, 2, 'bn1', 'gamma'); the stem has stage 0."""
    layer, weight = name.split("/")
    if layer in ("conv1_conv", "conv1_bn"):
        return 0, 0, layer.replace("conv1_", "stem_"), weight
    match = _KERAS_NAME.match(layer)
    if not match:
        return None
    index, kind = int(match[3]), match[4]
    module = f"shortcut_{kind}" if index == 0 else f"{kind}{index}"
    return int(match[1]) - 1, int(match[2]), module, weight


def _keras_leaf(module: str, weight: str, value: np.ndarray):
    if "conv" in module:
        return ("params", weight, value) if weight in ("kernel", "bias") else None
    return (*_BN_KERAS[weight], value) if weight in _BN_KERAS else None


def keras_to_tree(tensors: dict[str, np.ndarray]):
    """Maps Keras names onto jaxcap's tree (see ``_to_tree``)."""
    head = lambda name: name.split("/")[0] in ("predictions", "probs", "fc1000")  # noqa: E731
    return _to_tree(tensors, head, _locate_keras, _keras_leaf)


# --------------------------------------------------------------------- torchvision


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torchvision state_dict from ``.safetensors`` or ``.pth``, as numpy arrays."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading .pth needs PyTorch (pip install torch), or "
                           "convert the file to .safetensors") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise WeightsError(f"{path}: not a loadable PyTorch weights file ({error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # training checkpoints wrap the weights
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}


_TORCH_NAME = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(\w+)$")
_TORCH_SHORTCUT = {"downsample.0": "shortcut_conv", "downsample.1": "shortcut_bn"}


def _locate_torch(name: str):
    """'layer2.0.downsample.1.running_var' -> (2, 1, 'shortcut_bn', 'running_var')."""
    if name.startswith(("conv1.", "bn1.")) and name.count(".") == 1:
        layer, weight = name.split(".")
        return 0, 0, "stem_conv" if layer == "conv1" else "stem_bn", weight
    match = _TORCH_NAME.match(name)
    if not match:
        return None
    layer = match[3]
    return int(match[1]), int(match[2]) + 1, _TORCH_SHORTCUT.get(layer, layer), match[4]


def _torch_leaf(module: str, weight: str, value: np.ndarray):
    if "conv" in module:
        if weight != "weight" or value.ndim != 4:
            return None
        return "params", "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    return (*_BN_TORCH[weight], value) if weight in _BN_TORCH else None


def torch_to_tree(tensors: dict[str, np.ndarray]):
    """Maps torchvision names onto jaxcap's tree (see ``_to_tree``)."""
    if tensors and all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}  # DataParallel
    # A training counter, and the classification head.
    skip = lambda name: name.endswith("num_batches_tracked") or name.startswith("fc.")  # noqa: E731
    return _to_tree(tensors, skip, _locate_torch, _torch_leaf)


# ------------------------------------------------------------------------- shared


def _to_tree(tensors, skip, locate, leaf_for) -> tuple[dict, dict, dict, list[str]]:
    """Places every source tensor in jaxcap's variable tree.

    ``locate(name)`` gives (stage, block, module, weight), stage 0 for the stem,
    or None; ``leaf_for(module, weight, value)`` gives (collection, leaf, value)
    or None. Returns (tree, blocks per stage, {tree path: source name}, names
    that are not understood).
    """
    tree: dict = {"params": {}, "batch_stats": {}}
    origins: dict[str, str] = {}
    blocks: dict[int, int] = {}
    unknown = []
    for name, value in tensors.items():
        if skip(name):
            continue
        place = locate(name)
        leaf = place and leaf_for(place[2], place[3], value)
        if not leaf:
            unknown.append(name)
            continue
        stage, block, module, _ = place
        collection, leaf_name, value = leaf
        prefix = (f"stage{stage}_block{block}",) if stage else ()
        if stage:
            blocks[stage] = max(blocks.get(stage, 0), block)
        _put(tree, (collection, *prefix, module, leaf_name), value, name, origins)
    return tree, blocks, origins, unknown



def _put(tree: dict, path: tuple[str, ...], value: np.ndarray, source_name: str,
         origins: dict[str, str]) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    assert path[-1] not in tree, f"two source tensors map to {path}: {source_name}"
    tree[path[-1]] = np.asarray(value, np.float32)
    origins["/".join(path)] = source_name


def _infer_depth(blocks: dict[int, int], bottleneck: bool, origin: str) -> int:
    counts = tuple(blocks.get(stage, 0) for stage in (1, 2, 3, 4))
    for depth, (sizes, is_bottleneck) in STAGE_SIZES.items():
        if sizes == counts and is_bottleneck == bottleneck:
            return depth
    raise WeightsError(f"{origin}: blocks per stage {counts} (bottleneck={bottleneck}) match "
                       f"no ResNet depth in {sorted(STAGE_SIZES)}")


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        flat.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return flat


def convert_weights(source: str, weights_path: str | os.PathLike, out_dir: str | os.PathLike,
                    log=print) -> Path:
    """Converts one weights file to a jaxcap weights directory and returns its path."""
    if source not in SOURCES:
        raise WeightsError(f"unknown source {source!r}; expected one of {SOURCES}")
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsError(f"{weights_path}: no such file")
    if source == "keras":
        tree, blocks, origins, unknown = keras_to_tree(read_keras_h5(weights_path))
    else:
        tree, blocks, origins, unknown = torch_to_tree(read_torch_state_dict(weights_path))
    variant, preprocessing = SOURCE_FORMAT[source]
    bottleneck = any("conv3" in path for path in _flatten(tree["params"]))
    depth = _infer_depth(blocks, bottleneck, str(weights_path))
    metadata = dict(architecture="resnet", depth=depth, variant=variant,
                    preprocessing=preprocessing,
                    source=dict(kind=source, file=weights_path.name,
                                sha256=file_digest(weights_path)))

    expected = _flatten(abstract_variables(metadata))
    given = _flatten(tree)
    problems = [f"unknown tensor {name}" for name in unknown]
    problems += [f"missing tensor for {path} (shape {expected[path].shape})"
                 for path in sorted(set(expected) - set(given))]
    problems += [f"unexpected tensor {origins[path]} (as {path})"
                 for path in sorted(set(given) - set(expected))]
    problems += [f"shape mismatch at {path} ({origins[path]}): file has {given[path].shape}, "
                 f"ResNet-{depth} {variant} needs {expected[path].shape}"
                 for path in sorted(set(given) & set(expected))
                 if given[path].shape != expected[path].shape]
    if problems:
        listing = "\n  ".join(problems)
        raise WeightsError(f"{weights_path}: cannot convert to ResNet-{depth} {variant} "
                           f"({len(problems)} problems, nothing written):\n  {listing}")
    out = save_encoder(out_dir, jax.tree.map(np.asarray, tree), metadata)
    log(f"converted {weights_path.name}: ResNet-{depth} {variant}, {preprocessing} "
        f"preprocessing, {len(given)} tensors -> {out}")
    return out


# ----------------------------------------------------------------------- download


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxcap" / "weights"


def download_official(source: str, cache_dir: str | os.PathLike | None = None,
                      url: str | None = None, log=print) -> Path:
    """Fetches the official ResNet-50 file of ``source`` and checks its pinned digest.

    ``url`` replaces the official address (a mirror); the pinned digest still
    applies. The file appears in the cache only once verified.
    """
    if source not in OFFICIAL_WEIGHTS:
        raise WeightsError(f"no official download for {source!r}; expected one of "
                           f"{sorted(OFFICIAL_WEIGHTS)}")
    pin = OFFICIAL_WEIGHTS[source]
    url = url or pin["url"]
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / pin["url"].rsplit("/", 1)[-1]
    if target.is_file() and file_digest(target, pin["algorithm"]) == pin["digest"]:
        log(f"using cached {target}")
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=cache_dir)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            log(f"downloading {url}")
            shutil.copyfileobj(response, out, 1 << 20)
        actual = file_digest(partial, pin["algorithm"])
        if actual != pin["digest"]:
            raise WeightsError(f"checksum mismatch for {url}: {pin['algorithm']} is {actual}, "
                               f"expected {pin['digest']}; the download was discarded")
        os.replace(partial, target)
    except OSError as error:
        raise WeightsError(f"download of {url} failed: {error}") from None
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


def init_weights(out_dir: str | os.PathLike, depth: int = 50, variant: str = "v1.5",
                 seed: int = 0, log=print, stages: int = 4) -> Path:
    """Writes randomly initialised weights (a network trained from scratch starts here).

    BatchNorm statistics start at mean 0, variance 1; the preprocessing is the
    one that goes with the variant's usual weight source. ``stages`` < 4 draws the
    stem and the first stages only (``encoder.cut_to_stage``), each parameter as the
    whole network draws it: Flax draws a parameter from its own path.
    """
    preprocessing = {variant: style for variant, style in SOURCE_FORMAT.values()}.get(variant)
    if preprocessing is None:
        raise WeightsError(f"variant must be one of {sorted(v for v, _ in SOURCE_FORMAT.values())}")
    if depth not in STAGE_SIZES:
        raise WeightsError(f"depth must be one of {sorted(STAGE_SIZES)}, got {depth}")
    if not 1 <= stages <= 4:
        raise WeightsError(f"stages must be 1..4, got {stages}")
    metadata = dict(architecture="resnet", depth=depth, variant=variant,
                    preprocessing=preprocessing, source=dict(kind="init", seed=seed))
    if stages < 4:
        metadata["stages"] = stages
    module = build_encoder(metadata)
    variables = jax.jit(module.init)(jax.random.PRNGKey(seed), np.zeros((1, 64, 64, 3), np.float32))
    out = save_encoder(out_dir, jax.tree.map(np.asarray, variables), metadata)
    held = "" if stages == 4 else f", stem and stages 1-{stages}"
    log(f"initialised ResNet-{depth} {variant} (seed {seed}{held}) -> {out}")
    return out


def main(args) -> int:
    """``jaxcap convert``: see ``jaxcap.cli``."""
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.paths[0] == "init":
        if len(args.paths) != 2:
            raise WeightsError("usage: jaxcap convert init OUT_DIR [--depth D] [--variant V]")
        init_weights(args.paths[1], args.depth, args.variant, args.seed, log=log)
        return 0
    if args.download:
        if len(args.paths) != 1:
            raise WeightsError("with --download give only OUT_DIR")
        source, out_dir = args.download, args.paths[0]
        weights = download_official(source, args.cache_dir, args.mirror)
    else:
        if len(args.paths) != 3:
            raise WeightsError("usage: jaxcap convert {keras,torchvision} WEIGHTS OUT_DIR "
                               "(or: jaxcap convert --download {keras,torchvision} OUT_DIR)")
        source, weights, out_dir = args.paths
    convert_weights(source, weights, out_dir, log=log)
    return 0
