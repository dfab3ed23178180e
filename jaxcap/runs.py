"""A run directory read back for captioning and evaluation.

Everything comes from ``RUN_DIR`` (see ``jaxcap.train``): ``config.json`` (the
model and how its images were prepared), ``vocabulary.json``, ``encoder/``
(the ResNet weights and the preprocessing they expect) and ``best/`` (the
checkpoint with the best validation BLEU-4).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxcap.checkpoints import Checkpoints
from jaxcap.data.text import Vocabulary
from jaxcap.models.captioner import Captioner
from jaxcap.models.encoder import load_encoder
from jaxcap.train import (TrainingError, init_state, learning_rate_schedule,
                          make_model, make_optimizer, read_saved_config, selection_metric)


@dataclasses.dataclass
class TrainedRun:
    workdir: Path
    config: ml_collections.ConfigDict
    vocabulary: Vocabulary
    step: int  # of the best checkpoint
    model: Captioner  # as trained: cached features in, or images in (end to end)
    variables: dict
    image_model: Captioner  # always uint8 images in: the encoder in the graph
    image_variables: dict

    @property
    def reads_images(self) -> bool:
        return self.model.encoder is not None


def read_run(workdir) -> tuple[Path, ml_collections.ConfigDict, Vocabulary]:
    """``(absolute workdir, config, vocabulary)`` of a run directory."""
    workdir = Path(workdir).expanduser().absolute()
    try:
        config = ml_collections.ConfigDict(read_saved_config(workdir))
        vocabulary = Vocabulary.load(workdir / "vocabulary.json")
    except FileNotFoundError as error:
        raise TrainingError(f"{workdir} is not a jaxcap run directory ({error.filename} is "
                            "missing); pass the --workdir of 'jaxcap train'") from None
    return workdir, config, vocabulary


def abstract_state(workdir: Path, config, vocabulary: Vocabulary):
    """``(model, abstract TrainState, encoder metadata, encoder variables)``: what the
    run's config builds today, as shapes only (what its checkpoints restore into)."""
    metadata, encoder_variables = load_encoder(workdir / "encoder")
    model = make_model(config, len(vocabulary), metadata)
    tx = make_optimizer(config, learning_rate_schedule(config, 1))
    # The decoder's parameters do not depend on the grid size, only its channels.
    inputs_shape = ((config.encoder.image_size,) * 2 + (3,) if model.encoder is not None
                    else (1, 1, model.decoder.feature_dim))
    embedding = np.zeros((len(vocabulary), config.decoder.embed_dim), np.float32)
    abstract = jax.eval_shape(lambda: init_state(
        model, config, inputs_shape, embedding,
        encoder_variables if model.encoder is not None else None, tx))
    return model, abstract, metadata, encoder_variables


def load_run(workdir, dtype: str | None = None) -> TrainedRun:
    """The best checkpoint of ``workdir`` with its model, vocabulary and encoder.

    ``dtype``: the precision to compute in (``float32``, ``bfloat16``) when not the
    run's own; checkpoints hold float32 parameters whatever the run computed in.
    """
    workdir, config, vocabulary = read_run(workdir)
    if dtype is not None:
        config.dtype = dtype
    if not (workdir / "best").is_dir() or not any((workdir / "best").iterdir()):
        raise TrainingError(f"{workdir} has no best checkpoint yet: it is written at the end of "
                            "the first training epoch")
    model, abstract, metadata, encoder_variables = abstract_state(workdir, config, vocabulary)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints, selection_metric(config)[0])
    try:
        state = checkpoints.restore_best(abstract)
    finally:
        checkpoints.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if model.encoder is not None:
        image_model, image_variables = model, variables
    else:  # put the encoder that made the cached features in front of the decoder
        image_config = ml_collections.ConfigDict(config.to_dict())
        image_config.encoder.mode = "end_to_end"
        image_model = make_model(image_config, len(vocabulary), metadata)
        image_variables = {"params": {"decoder": state.params["decoder"],
                                      "encoder": encoder_variables["params"]},
                           "batch_stats": {**state.batch_stats,
                                           "encoder": encoder_variables["batch_stats"]}}
    return TrainedRun(workdir, config, vocabulary, int(state.step), model, variables,
                      image_model, image_variables)
