"""The settings of a run checked before it writes or builds anything.

``check_settings`` holds every value of the config to its range (a
``TrainingError`` names the first that is not, and what it must be), including
what the model and the schedule would only find when they are built: a new run
writes ``config.json`` first, and would then be bound to the mistake.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcap.data import glove
from jaxcap.data.pipeline import CAPTION_MODES
from jaxcap.data.prepare import shapes_spec
from jaxcap.errors import UserError
from jaxcap.models.captioner import check_encoder_settings
from jaxcap.models.decoders import make_decoder


class TrainingError(UserError):
    """A run that cannot go on; the message says why and what to do."""


# The smallest value each numeric setting takes. A learning rate of 0 is allowed (the model
# stays as it is: the tests use it); a clipping norm of 0 is not (every update would be 0).
AT_LEAST = {
    "learning_rate": 0, "scst.learning_rate": 0, "encoder.image_size": 1,
    "batch_size": 1, "eval.batch_size": 1, "encoder.extract_batch_size": 1,
    "checkpoint_every_steps": 1, "keep_checkpoints": 1, "log_every_steps": 1,
    "warmup_steps": 0, "plateau_patience": 1, "early_stopping_patience": 0, "num_threads": 0,
    "text.max_length": 3, "eval.max_length": 2,  # <start>, a word, <end>; <start>, <end>
    "text.length_multiple": 0, "text.bucket_window": 1, "encoder.grid": 0}
CHOICES = {"dtype": ("float32", "bfloat16"), "text.captions": CAPTION_MODES,
           "encoder.stage": (1, 2, 3, 4), "objective": ("cross_entropy", "scst"),
           "schedule": ("constant", "warmup", "cosine")}


def check_settings(config) -> None:
    """The config's values in their ranges, before the run writes or builds anything: a
    ``TrainingError`` names the first one that is not, and what it must be."""
    def value(key):
        return functools.reduce(lambda node, part: node[part], key.split("."), config)

    def wrong(key, expected):
        raise TrainingError(f"{key}={value(key)!r}: must be {expected}")

    for key, least in AT_LEAST.items():
        if value(key) < least:
            wrong(key, f"at least {least}")
    if not config.grad_clip_norm > 0:
        wrong("grad_clip_norm", "above 0")
    for key, choices in CHOICES.items():
        if value(key) not in choices:
            wrong(key, f"one of {', '.join(map(str, choices))}")
    if not 0 <= config.decoder.label_smoothing < 1:
        wrong("decoder.label_smoothing", "at least 0 and below 1")
    if not 0 < config.plateau_factor <= 1:
        wrong("plateau_factor", "above 0 and at most 1")
    if config.num_epochs < 1 and config.num_train_steps < 1:
        wrong("num_epochs", "at least 1 (or num_train_steps at least 1)")
    shapes_spec(config)  # its own ranges (a DataError)
    decoder(config, 2, 1)
    try:
        check_encoder_settings(config.encoder)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    glove_dim = glove.dimension(config.glove.source)  # a GloveError when it cannot be read
    if config.decoder.embed_dim != glove_dim:
        raise TrainingError(f"decoder.embed_dim is {config.decoder.embed_dim} but the GloVe "
                            f"vectors ({config.glove.source}) have {glove_dim} dimensions")


def decoder(config, vocab_size: int, feature_dim: int):
    """The decoder the config describes; a ``TrainingError`` names a setting out of range."""
    try:
        return make_decoder(config.decoder, vocab_size, feature_dim, jnp.dtype(config.dtype))
    except ValueError as error:  # it names the setting
        raise TrainingError(str(error)) from None


def check_batch_sizes(config) -> None:
    """Global batches, split evenly over every device of every process."""
    devices = jax.device_count()
    where = (f"{devices} devices ({jax.process_count()} processes x "
             f"{jax.local_device_count()})" if jax.process_count() > 1 else
             f"{devices} local devices")
    for key, size in (("batch_size", config.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
        if size % devices:
            raise TrainingError(f"{key} {size} is not a multiple of the {where}")
