"""A run's data made ready, for training and for evaluation alike: the dataset built (TFDS),
its images' features extracted once into a cache keyed by the encoder (``features`` mode),
and the options of the batches read from them."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

import jax

from jaxcap.data import builders, shapes
from jaxcap.data.pipeline import FeatureStore, PipelineOptions, SplitIndex
from jaxcap.extract import extract_entries
from jaxcap.models.encoder import read_metadata, weights_identity


def shapes_spec(config) -> shapes.ShapesSpec | None:
    """The shapes dataset's spec (a ``DataError`` for a value out of range), None for others."""
    if config.dataset.name != "shapes":
        return None
    return shapes.ShapesSpec(**config.dataset.shapes.to_dict())


def data_dir(config) -> Path:
    return Path(os.path.expanduser(config.dataset.data_dir)).absolute()


def prepare_dataset(config):
    """The config's dataset, built once under ``dataset.data_dir`` (then reused)."""
    return builders.prepare(config.dataset.name, data_dir(config),
                            config.dataset.manual_dir or None, spec=shapes_spec(config),
                            strict=config.dataset.strict, split_seed=config.dataset.split_seed)


def features_dir(config, built, encoder_dir: Path, split: str) -> Path:
    if config.encoder.features_dir:
        return Path(os.path.expanduser(config.encoder.features_dir)) / split
    metadata = weights_identity(read_metadata(encoder_dir))
    key = hashlib.sha256(json.dumps([metadata, config.encoder.stage, config.encoder.grid,
                                     config.encoder.image_size, config.encoder.resize],
                                    sort_keys=True).encode()).hexdigest()[:12]
    config_name = built.builder_config.name if built.builder_config else "default"
    return (data_dir(config) / "jaxcap_features" / config.dataset.name / config_name /
            f"encoder-{key}" / split)


def prepare_features(config, built, encoder_dir: Path, split: str) -> FeatureStore:
    """Features of ``split``, extracted once (resumably) and cached by encoder."""
    out = features_dir(config, built, encoder_dir, split)
    source = built.as_data_source(split)
    index = SplitIndex(source)
    entries = [(image_id, functools.partial(_image_bytes, source, i))
               for i, image_id in enumerate(index.image_ids)]
    extract_entries(encoder_dir, entries, out, batch_size=config.encoder.extract_batch_size,
                    image_size=config.encoder.image_size, grid=config.encoder.grid or None,
                    stage=config.encoder.stage, resize=config.encoder.resize,
                    progress=False, log=lambda m: print(m, file=sys.stderr))
    return FeatureStore(out)


def _image_bytes(source, index: int) -> bytes:
    return source[index]["image"].tobytes()


def pipeline_options(config) -> tuple[PipelineOptions, PipelineOptions]:
    """Options of the training batches and of the evaluation batches (in order, all images)."""
    options = PipelineOptions(
        batch_size=config.batch_size, max_length=config.text.max_length, seed=config.seed,
        captions=config.text.captions, drop_remainder=True,  # batch_size: the global batch
        length_multiple=config.text.length_multiple, bucket_window=config.text.bucket_window,
        image_size=config.encoder.image_size,
        resize=config.encoder.resize, num_threads=config.num_threads,
        process_index=jax.process_index(), process_count=jax.process_count())
    return options, dataclasses.replace(options, batch_size=config.eval.batch_size, shuffle=False,
                                        drop_remainder=False, length_multiple=0)
