"""``jaxcap export``: a trained captioner as one portable artifact that runs without jaxcap.

The whole image-to-caption function (uint8 pixels at the run's input size ->
normalisation -> encoder -> the search -> tokens, scores, attention) is exported with
``jax.export``: StableHLO with a symbolic batch dimension, for every platform asked
(lowering for CUDA or TPU needs no such device), loadable by ``jax`` alone and
callable from any JAX that reads its serialization version. ``OUT`` holds:

* ``captioner.jax``: the serialized function, of ``(variables, pixels)``;
* ``variables.npz``: the parameters and statistics it takes, as its flat list;
* ``captioner.json``: the vocabulary, the preprocessing the pixels must have had
  (size, resize rule; the function normalises them itself), the search it decodes
  with, the platforms, the run it came from, the versions, and each file's SHA-256.

``jaxcap/exported.py`` loads it with jax, numpy and pillow alone. The search is
fixed when exporting (greedy or beam search: sampling draws from a random stream).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import io
import json
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from jaxcap import __version__, exported
from jaxcap.data.text import Vocabulary
from jaxcap.decode import Captions, SearchOptions, search_function
from jaxcap.errors import UserError
from jaxcap.exported import FORMAT
from jaxcap.files import write_text_atomic

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(UserError):
    """The run cannot be exported as asked; the message says why."""


def export_model(model, variables, vocabulary, preprocessing: dict, options: SearchOptions,
                 platforms, out: Path, about: dict | None = None) -> Path:
    """Writes ``model`` (uint8 images in) with ``variables`` as an artifact in ``out``."""
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ExportError(f"--platforms {','.join(platforms)}: each must be one of "
                          f"{', '.join(PLATFORMS)}")
    try:
        search = search_function(model, options)
    except ValueError as error:
        raise ExportError(str(error)) from None
    leaves, treedef = jax.tree.flatten(variables)
    leaves = [np.asarray(leaf) for leaf in leaves]

    def caption(leaves, pixels):
        return search(jax.tree.unflatten(treedef, leaves), pixels)

    side = preprocessing["image_size"]
    batch, = jax.export.symbolic_shape("batch")
    function = jax.export.export(jax.jit(caption), platforms=tuple(platforms))(
        [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves],
        jax.ShapeDtypeStruct((batch, side, side, 3), np.uint8))
    arrays = io.BytesIO()
    np.savez(arrays, *leaves)
    files = {"captioner.jax": bytes(function.serialize()), "variables.npz": arrays.getvalue()}
    spec = {"format": FORMAT, "version": 1, "jaxcap_version": __version__,
            "jax_version": jax.__version__, "platforms": list(platforms),
            "calling_convention_version": function.calling_convention_version,
            "search": dataclasses.asdict(options), "preprocessing": preprocessing,
            "inputs": f"uint8 (batch, {side}, {side}, 3) RGB pixels",
            "outputs": {"tokens": f"int32 (batch, {options.max_length}): <start> first, "
                                  "<pad> after <end>",
                        "scores": "float32 (batch,): summed log-probability of the words",
                        "attention": f"float32 (batch, {options.max_length - 1}, regions)"},
            **(about or {}), "vocabulary": list(vocabulary.tokens),
            "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    return _write(out, files, spec)


def _write(out: Path, files: dict[str, bytes], spec: dict) -> Path:
    """The artifact written beside ``out`` and renamed into place: never half there."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty: export into a new folder")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    write_text_atomic(staging / "captioner.json", json.dumps(spec, indent=1) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return out


def export_run(workdir, out, options: SearchOptions, dtype: str | None = None,
               platforms=("cpu",)) -> Path:
    from jaxcap.runs import load_run

    run = load_run(workdir, dtype)
    config = run.config
    preprocessing = {"image_size": config.encoder.image_size, "resize": config.encoder.resize,
                     "normalisation": run.image_model.preprocessing, "inside": True}
    about = {"run": {"name": run.workdir.name, "checkpoint_step": run.step,
                     "dataset": config.dataset.name, "decoder_variant": config.decoder.variant,
                     "dtype": config.dtype}}
    return export_model(run.image_model, run.image_variables, run.vocabulary, preprocessing,
                        options, platforms, Path(out).expanduser().absolute(), about)


class ExportedSearch:
    """An exported captioner behind ``CaptionSearch``'s interface, for ``caption`` and
    ``serve``: batches padded to a few bucket sizes (each compiles once), the search it was
    exported with and no other."""

    def __init__(self, directory, max_batch: int = 64, compilation_cache=None):
        try:
            self.captioner = exported.load(directory, compilation_cache)
        except exported.ArtifactError as error:
            raise ExportError(str(error)) from None
        spec = self.captioner.spec
        self.options = SearchOptions(**spec["search"])
        self.vocabulary = Vocabulary(spec["vocabulary"])
        self.image_size = spec["preprocessing"]["image_size"]
        self.resize = spec["preprocessing"]["resize"]
        self.max_batch = max_batch
        self.buckets = sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length())})
        self._compiled: set[int] = set()

    def bucket(self, count: int) -> int:
        return next(size for size in self.buckets if size >= count)

    def with_options(self, options: SearchOptions) -> "ExportedSearch":
        if options != self.options:
            raise ValueError(f"an exported captioner decodes with the search it was exported "
                             f"with: {self.options}")
        return self

    def compile(self, input_shape: tuple, dtype) -> int:
        """Every bucket's program compiled, by a call on blank images."""
        for size in self.buckets:
            self.captioner(np.zeros((size, *input_shape), dtype))
            self._compiled.add(size)
        return len(self.buckets)

    @property
    def compiled(self) -> int:
        return len(self._compiled)

    def _chunk(self, chunk: np.ndarray, first_index: int = 0):
        padded = np.concatenate([chunk, np.repeat(chunk[:1], self.bucket(len(chunk)) -
                                                  len(chunk), axis=0)])
        return tuple(x[:len(chunk)] for x in self.captioner(padded))

    def stream(self, items, first_index: int = 0):
        """``(key, tokens, score, alphas)`` of every ``(key, input)`` of ``items``, in order,
        ``max_batch`` at a time."""
        items = iter(items)
        while chunk := list(itertools.islice(items, self.max_batch)):
            keys, inputs = zip(*chunk)
            yield from zip(keys, *self._chunk(np.stack(inputs)))

    def __call__(self, inputs: np.ndarray, first_index: int = 0) -> Captions:
        parts = [self._chunk(inputs[start:start + self.max_batch])
                 for start in range(0, len(inputs), self.max_batch)]
        tokens, scores, alphas = (np.concatenate(arrays) for arrays in zip(*parts))
        return Captions(tokens, [self.vocabulary.decode(row) for row in tokens], scores, alphas)


def main(args) -> int:
    """``jaxcap export``: see ``jaxcap.cli``."""
    from jaxcap.caption import search_options
    from jaxcap.runs import read_run

    _, config, _ = read_run(args.workdir)
    options = search_options(args, config.eval.max_length)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    out = export_run(args.workdir, args.out, options, args.dtype, platforms)
    print(f"exported {args.workdir} ({', '.join(platforms)}; beam {options.beam_size}, at most "
          f"{options.max_length} tokens) to {out}", file=sys.stderr)
    return 0
