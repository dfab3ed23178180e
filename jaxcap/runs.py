"""A run directory read back, for everything that comes after training.

Training (``jaxcap.train``) writes ``RUN_DIR``: ``config.json`` (the model and
how its images were prepared), ``vocabulary.json``, ``encoder/`` (the ResNet
weights and the preprocessing they expect) and its checkpoints, ``best/`` among
them (the best by the validation score). ``caption``, ``evaluate``, ``serve``
and ``migrate`` read it through this module, which knows nothing of training:
``load_run`` restores what captioning needs (the parameters and the batch
statistics of the best checkpoint), never the optimizer's state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from jaxcap.checkpoints import Checkpoints
from jaxcap.data.text import Vocabulary
from jaxcap.errors import UserError
from jaxcap.models.captioner import Captioner, build_captioner
from jaxcap.models.encoder import load_encoder


class RunError(UserError):
    """A run directory that cannot be read as asked; the message says why and what to do."""


# Settings added to jaxcap since runs began, with the value a run started before them had:
# a resumed or loaded run keeps computing as it was trained.
# (A run started before SCST was part of the shapes default trained by cross-entropy only,
# and picked its best checkpoint by BLEU-4.)
AS_BEFORE = {"encoder.batchnorm": "frozen", "scst.from_epoch": -1}


def lookup(tree, dotted: str):
    """``tree[a][b]`` for ``dotted`` "a.b", or None where a part is missing."""
    node = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def assign(tree, dotted: str, value) -> None:
    """``tree[a][b] = value`` for ``dotted`` "a.b" (a dict or a ConfigDict); sections a
    saved config (a dict) lacks are added."""
    *sections, name = dotted.split(".")
    for section in sections:
        if isinstance(tree, dict) and section not in tree:
            tree[section] = {}
        tree = tree[section]
    tree[name] = value


def settings_as_started(saved: dict) -> dict:
    """``{dotted key: value}`` of the ``AS_BEFORE`` settings a run's saved config predates."""
    return {key: value for key, value in AS_BEFORE.items() if lookup(saved, key) is None}


def read_saved_config(workdir: Path) -> dict:
    """A run's ``config.json``, with the ``AS_BEFORE`` settings it predates filled in."""
    saved = json.loads((workdir / "config.json").read_text())
    for key, value in settings_as_started(saved).items():
        assign(saved, key, value)
    return saved


def first_scst_epoch(config) -> int | None:
    """The first epoch trained by self-critical training: 0 for ``objective=scst`` (a run
    continuing ``init_from``), ``scst.from_epoch`` for a cross-entropy run that switches
    to it, None for a run without it (also a run started before SCST existed)."""
    if config.get("objective", "cross_entropy") == "scst":
        return 0
    from_epoch = config.get("scst", {}).get("from_epoch", -1)
    return from_epoch if from_epoch >= 0 else None


def selection_metric(config) -> tuple[str, str]:
    """``(key, name)`` of the validation score that picks the best checkpoint, cuts the
    rate and stops early: BLEU-4, or CIDEr-D when training on it (SCST)."""
    return ("bleu4", "BLEU-4") if first_scst_epoch(config) is None else ("cider", "CIDEr-D")


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
        raise RunError(f"{workdir} is not a jaxcap run directory ({error.filename} is "
                       "missing); pass the --workdir of 'jaxcap train'") from None
    return workdir, config, vocabulary


def build_model(config, vocabulary: Vocabulary, metadata: dict) -> Captioner:
    try:
        return build_captioner(config, len(vocabulary), metadata)
    except ValueError as error:  # it names the setting
        raise RunError(f"{error} (in the run's config.json)") from None


def _decoder_of(captioner: Captioner, grid, tokens):
    return captioner.decoder(grid, tokens)


def abstract_variables(model: Captioner, config, encoder_variables: dict) -> dict:
    """The shapes of a run's ``params`` and ``batch_stats`` as its config builds them today
    (what a checkpoint restores into): the decoder's (they do not depend on the grid's
    size, only its channels) and, end to end, the encoder's."""
    grid = jnp.zeros((1, 1, 1, model.decoder.feature_dim), jnp.float32)
    tokens = jnp.zeros((1, config.text.max_length - 1), jnp.int32)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(0)}
    decoder = jax.eval_shape(lambda: model.init(rngs, grid, tokens, method=_decoder_of))
    variables = {"params": dict(decoder["params"]),
                 "batch_stats": dict(decoder.get("batch_stats", {}))}
    if model.encoder is not None:
        for collection in variables:
            variables[collection]["encoder"] = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                encoder_variables[collection])
    return variables


def load_run(workdir, dtype: str | None = None) -> TrainedRun:
    """The best checkpoint of ``workdir`` with its model, vocabulary and encoder.

    ``dtype``: the precision to compute in (``float32``, ``bfloat16``) when not the
    run's own; checkpoints hold float32 parameters whatever the run computed in.
    """
    workdir, config, vocabulary = read_run(workdir)
    if dtype is not None:
        config.dtype = dtype
    if not (workdir / "best").is_dir() or not any((workdir / "best").iterdir()):
        raise RunError(f"{workdir} has no best checkpoint yet: it is written at the end of the "
                       "first training epoch")
    metadata, encoder_variables = load_encoder(workdir / "encoder")
    model = build_model(config, vocabulary, metadata)
    checkpoints = Checkpoints(workdir, config.keep_checkpoints, selection_metric(config)[0])
    try:
        variables, step = checkpoints.restore_best_variables(
            abstract_variables(model, config, encoder_variables))
    finally:
        checkpoints.close()
    if model.encoder is not None:
        image_model, image_variables = model, variables
    else:  # put the encoder that made the cached features in front of the decoder
        image_config = ml_collections.ConfigDict(config.to_dict())
        image_config.encoder.mode = "end_to_end"
        image_model = build_model(image_config, vocabulary, metadata)
        image_variables = {"params": {"decoder": variables["params"]["decoder"],
                                      "encoder": encoder_variables["params"]},
                           "batch_stats": {**variables["batch_stats"],
                                           "encoder": encoder_variables["batch_stats"]}}
    return TrainedRun(workdir, config, vocabulary, step, model, variables, image_model,
                      image_variables)
