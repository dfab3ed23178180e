"""Training: ``train_and_evaluate(config, workdir)`` and the ``jaxcap train`` command.

The loop, top to bottom:

1. The run directory gets everything needed to caption with it later:
   ``config.json``, ``vocabulary.json`` (built from the training captions),
   ``encoder/`` (converted or randomly initialised ResNet weights).
2. The dataset is built through TFDS if it is not yet (``shapes`` is generated),
   and in ``features`` mode its images go through ``jaxcap extract`` once, into
   a cache keyed by the encoder.
3. ``jax.pmap`` runs the train step on every local device (``axis_name='batch'``):
   masked token cross-entropy plus the decoder variant's own loss terms (the
   doubly stochastic attention penalty, REINFORCE, ...), gradients summed over
   devices with each term normalised by a *global* count of tokens or examples
   (so 4 devices give exactly the update of 1 device on the whole batch),
   Optax Adam with global-norm clipping and a schedule, a dropout RNG per
   device and step, the state donated.
4. Orbax checkpoints (``jaxcap.checkpoints``) every ``checkpoint_every_steps``
   and at each epoch end (keeping the last ``keep_checkpoints``,
   asynchronously) and the best by validation BLEU-4 in ``best/``. A restarted
   run restores the latest readable checkpoint and continues with the same
   data order and RNG, so its losses equal those of a run that never stopped.
5. Each epoch: validation loss and greedy BLEU-4; the learning rate is cut on a
   BLEU-4 plateau and training stops early when it stalls.
6. A NaN or Inf loss stops the run with a message; the bad update is never
   applied, so no checkpoint of a bad state can be written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from jaxcap import configs, distributed, scst
from jaxcap.checkpoints import Checkpoints, write_run_info
from jaxcap.convert import init_weights
from jaxcap.data import builders, glove, shapes
from jaxcap.data.pipeline import (CAPTION_MODES, Batcher, FeatureStore, PipelineOptions,
                                  SplitIndex)
from jaxcap.data.text import PAD_ID, Vocabulary
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.extract import extract_entries, write_text_atomic
from jaxcap.metrics import caption_metrics, object_metrics
from jaxcap.models import precision
from jaxcap.models.captioner import Captioner
from jaxcap.models.decoders import make_decoder
from jaxcap.models.encoder import (build_encoder, cut_to_stage, load_encoder, read_metadata,
                                   save_encoder, weights_identity)
from jaxcap.models.resnet import output_channels

# Config sections that define the model and its data: a resumed run must not change them.
MODEL_KEYS = ("decoder", "encoder.weights", "encoder.init_depth", "encoder.init_variant",
              "encoder.stage", "encoder.grid", "encoder.image_size", "encoder.resize",
              "encoder.mode", "encoder.finetune", "encoder.batchnorm", "text", "glove",
              "dataset.name", "dataset.shapes", "seed")
# What a run continued by SCST (objective=scst) takes from the run it starts from.
INHERITED_KEYS = tuple(key for key in MODEL_KEYS if key != "seed")
# Settings that shaped a run's history: they may change until its first checkpoint, not after.
# The SCST stage boundary decides which validation score picks and compares the best
# checkpoints (BLEU-4 without SCST, CIDEr-D with it) and where the learning rate switches.
HISTORY_KEYS = ("scst.from_epoch",)


class TrainingError(Exception):
    """A run that cannot go on; the message says why and what to do."""


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    lr_scale: jnp.ndarray  # cut on a validation plateau
    nonfinite: jnp.ndarray  # a NaN/Inf loss was seen; that update was not applied


# ----------------------------------------------------------------------- the run dir


def _lookup(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


# Settings added to jaxcap since runs began, with the value a run started before them had:
# a resumed or loaded run keeps computing as it was trained.
# (A run started before SCST was part of the shapes default trained by cross-entropy only,
# and picked its best checkpoint by BLEU-4.)
AS_BEFORE = {"encoder.batchnorm": "frozen", "scst.from_epoch": -1}


def settings_as_started(saved: dict) -> dict:
    """``{dotted key: value}`` of the ``AS_BEFORE`` settings a run's saved config predates."""
    return {key: value for key, value in AS_BEFORE.items() if _lookup(saved, key) is None}


def assign(tree, dotted: str, value) -> None:
    """``tree[a][b] = value`` for ``dotted`` "a.b" (a dict or a ConfigDict); sections a
    saved config (a dict) lacks are added."""
    *sections, name = dotted.split(".")
    for section in sections:
        if isinstance(tree, dict) and section not in tree:
            tree[section] = {}
        tree = tree[section]
    tree[name] = value


def read_saved_config(workdir: Path) -> dict:
    """A run's ``config.json``, with the ``AS_BEFORE`` settings it predates filled in."""
    saved = json.loads((workdir / "config.json").read_text())
    for key, value in settings_as_started(saved).items():
        assign(saved, key, value)
    return saved


def _as_started(config: ml_collections.ConfigDict, workdir: Path, log) -> None:
    path = workdir / "config.json"
    if path.exists():
        for key, value in settings_as_started(json.loads(path.read_text())).items():
            log(f"{key}: {value!r}, as the run was started (its config.json predates the "
                f"setting)")
            assign(config, key, value)


def _leaves(value, key: str):
    """``(dotted key, value)`` of every setting in ``value`` (a section or one setting)."""
    if not isinstance(value, dict):
        yield key, value
        return
    for name, item in value.items():
        yield from _leaves(item, f"{key}.{name}")


def _known_to(saved, current):
    """``current`` cut to the keys ``saved`` has: a setting added to jaxcap after a run
    was started takes its default there, so it does not stop that run from resuming."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return current
    return {key: _known_to(saved[key], value) for key, value in current.items() if key in saved}


def _check_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A run resumes only with the model config it was started with."""
    path = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if path.exists():
        saved = json.loads(path.read_text())
        objective = saved.get("objective", "cross_entropy")
        if objective != config.objective:
            raise TrainingError(f"{workdir} holds a run trained with objective={objective}; "
                                f"objective={config.objective} needs a new --workdir")
        known = _known_to(saved, current)
        changed = []
        for key in MODEL_KEYS:  # setting by setting, so that a section names what changed
            before = dict(_leaves(_lookup(saved, key), key))
            now = dict(_leaves(_lookup(known, key), key))
            changed += [(k, before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys())
                        if before.get(k) != now.get(k)]
        trained = any(path.name.isdigit() for folder in ("checkpoints", "best")
                      if (workdir / folder).is_dir() for path in (workdir / folder).iterdir())
        if changed:
            details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
            advice = ("Use a new --workdir, or the original values, to resume." if trained else
                      "It has no checkpoint yet: use a new --workdir, or delete this one to "
                      "start it again with this config.")
            raise TrainingError(f"{workdir} holds a run with another model config ({details}). "
                                + advice)
        for key in HISTORY_KEYS if trained else ():
            before = _lookup(saved, key)
            before = AS_BEFORE.get(key) if before is None else before
            if before != _lookup(current, key):
                raise TrainingError(
                    f"{workdir} was trained with {key}={before!r}, not {_lookup(current, key)!r}: "
                    f"the SCST stage boundary decides which validation score picks its best "
                    f"checkpoint and where the learning rate switches, so it cannot change once "
                    f"the run has a checkpoint. Resume with --config.{key}={before}, or train "
                    f"into a new --workdir.")


def _write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """``config.json``, written once the run has started (or resumed) with ``config``."""
    current = json.loads(config.to_json_best_effort())
    write_text_atomic(workdir / "config.json", json.dumps(current, indent=2, sort_keys=True) + "\n")


def _start_from_run(config: ml_collections.ConfigDict, workdir: Path, log) -> Path:
    """SCST: the run in ``init_from`` checked, its model settings taken, its vocabulary and
    encoder copied into ``workdir``; returns its directory."""
    try:
        run = scst.check_init_run(config.init_from, workdir)
    except scst.InitError as error:
        raise TrainingError(str(error)) from None
    saved = read_saved_config(run)
    given = json.loads(config.to_json_best_effort())
    for key in INHERITED_KEYS:
        value = _lookup(saved, key)
        if value is None:
            continue
        if _lookup(given, key) != value:
            log(f"{key}: as in {run} (the run SCST starts from)")
        value = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
        with config.ignore_type():
            assign(config, key, value)
    scst.copy_run_files(run, workdir)
    return run


def prepare_encoder(config, workdir: Path) -> Path:
    """``workdir/encoder``: the converted weights, or random ones, of the stem and the
    stages the model uses (``encoder.stage``): the stages after it would only be
    carried through every optimizer step and checkpoint. (A run written before keeps
    its whole network.)"""
    target = workdir / "encoder"
    if target.exists():
        return target
    if config.encoder.weights:
        metadata, variables = cut_to_stage(
            *load_encoder(Path(config.encoder.weights).expanduser()), config.encoder.stage)
        save_encoder(target, variables, metadata)
    else:
        init_weights(target, config.encoder.init_depth, config.encoder.init_variant,
                     seed=config.seed, log=lambda m: print(m, file=sys.stderr),
                     stages=config.encoder.stage)
    return target


def _shapes_spec(config) -> shapes.ShapesSpec | None:
    if config.dataset.name != "shapes":
        return None
    return shapes.ShapesSpec(**config.dataset.shapes.to_dict())


def _data_dir(config) -> Path:
    return Path(os.path.expanduser(config.dataset.data_dir)).absolute()


def prepare_dataset(config):
    built = builders.prepare(config.dataset.name, _data_dir(config),
                             config.dataset.manual_dir or None, spec=_shapes_spec(config),
                             strict=config.dataset.strict, split_seed=config.dataset.split_seed)
    return built


def _features_dir(config, built, encoder_dir: Path, split: str) -> Path:
    if config.encoder.features_dir:
        return Path(os.path.expanduser(config.encoder.features_dir)) / split
    metadata = weights_identity(read_metadata(encoder_dir))
    key = hashlib.sha256(json.dumps([metadata, config.encoder.stage, config.encoder.grid,
                                     config.encoder.image_size, config.encoder.resize],
                                    sort_keys=True).encode()).hexdigest()[:12]
    config_name = built.builder_config.name if built.builder_config else "default"
    return (_data_dir(config) / "jaxcap_features" / config.dataset.name / config_name /
            f"encoder-{key}" / split)


def prepare_features(config, built, encoder_dir: Path, split: str) -> FeatureStore:
    """Features of ``split``, extracted once (resumably) and cached by encoder."""
    out = _features_dir(config, built, encoder_dir, split)
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
           "encoder.stage": (1, 2, 3, 4)}


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
    _shapes_spec(config)  # its own ranges (a DataError)
    # What the model and the schedule check when they are built (the decoder's settings,
    # its variant's own included), checked now: a new run writes config.json before it
    # builds them, and would then be bound to the mistake.
    _decoder(config, 2, 1, jnp.dtype(config.dtype))
    _check_encoder_settings(config)
    learning_rate_schedule(config, 1)
    glove_dim = glove.dimension(config.glove.source)  # a GloveError when it cannot be read
    if config.decoder.embed_dim != glove_dim:
        raise TrainingError(f"decoder.embed_dim is {config.decoder.embed_dim} but the GloVe "
                            f"vectors ({config.glove.source}) have {glove_dim} dimensions")


def _check_batch_sizes(config) -> None:
    """Global batches, split evenly over every device of every process."""
    devices = jax.device_count()
    where = (f"{devices} devices ({jax.process_count()} processes x "
             f"{jax.local_device_count()})" if jax.process_count() > 1 else
             f"{devices} local devices")
    for key, size in (("batch_size", config.batch_size),
                      ("eval.batch_size", config.eval.batch_size)):
        if size % devices:
            raise TrainingError(f"{key} {size} is not a multiple of the {where}")


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


# ------------------------------------------------------------------------- model


def _decoder(config, vocab_size: int, feature_dim: int, dtype):
    try:
        return make_decoder(config.decoder, vocab_size, feature_dim, dtype)
    except ValueError as error:  # it names the setting
        raise TrainingError(str(error)) from None


def _check_encoder_settings(config) -> None:
    if config.encoder.batchnorm not in ("frozen", "batch"):
        raise TrainingError(f"encoder.batchnorm must be frozen or batch, "
                            f"got {config.encoder.batchnorm!r}")
    if config.encoder.mode not in ("features", "end_to_end"):
        raise TrainingError(f"encoder.mode must be features or end_to_end, "
                            f"got {config.encoder.mode!r}")
    if config.encoder.mode == "end_to_end" and config.encoder.batchnorm == "batch" and \
            not config.encoder.finetune:
        raise TrainingError("encoder.batchnorm=batch trains the encoder's normalisation: "
                            "it needs encoder.finetune=true")


def make_model(config, vocab_size: int, encoder_metadata: dict) -> Captioner:
    dtype = jnp.dtype(config.dtype)
    precision.warn_if_bfloat16_is_slow(dtype)
    feature_dim = output_channels(encoder_metadata["depth"], config.encoder.stage)
    decoder = _decoder(config, vocab_size, feature_dim, dtype)
    _check_encoder_settings(config)
    encoder = None
    train_batchnorm = config.encoder.batchnorm == "batch"
    if config.encoder.mode == "end_to_end":
        encoder = build_encoder(encoder_metadata, stage=config.encoder.stage,
                                grid=config.encoder.grid or None, dtype=dtype,
                                batchnorm_axis="batch" if train_batchnorm else None)
    return Captioner(decoder, encoder, encoder_metadata["preprocessing"],
                     finetune_encoder=config.encoder.finetune,
                     train_batchnorm=train_batchnorm and encoder is not None)


def first_scst_epoch(config) -> int | None:
    """The first epoch trained by self-critical training: 0 for ``objective=scst`` (a run
    continuing ``init_from``), ``scst.from_epoch`` for a cross-entropy run that switches
    to it, None for a run without it (also a run started before SCST existed)."""
    if config.get("objective", "cross_entropy") == "scst":
        return 0
    from_epoch = config.get("scst", {}).get("from_epoch", -1)
    return from_epoch if from_epoch >= 0 else None


def learning_rate_schedule(config, total_steps: int, steps_per_epoch: int = 1):
    """``learning_rate`` by ``schedule``; SCST steps train at ``scst.learning_rate``: the
    whole schedule of an ``objective=scst`` run, constant from ``scst.from_epoch`` on."""
    switch = first_scst_epoch(config)
    base = config.scst.learning_rate if switch == 0 else config.learning_rate
    warmup = max(1, min(config.warmup_steps, total_steps))
    if config.schedule == "constant":
        schedule = optax.constant_schedule(base)
    elif config.schedule == "warmup":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, base, warmup),
                                         optax.constant_schedule(base)], [warmup])
    elif config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, base, warmup,
                                                      max(total_steps, warmup + 1))
    else:
        raise TrainingError(f"schedule must be constant, warmup or cosine, "
                            f"got {config.schedule!r}")
    if switch:
        schedule = optax.join_schedules(
            [schedule, optax.constant_schedule(config.scst.learning_rate)],
            [switch * steps_per_epoch])
    return schedule


def make_optimizer(config, schedule) -> optax.GradientTransformation:
    """Adam with clipping; frozen parts (GloVe embeddings, a fixed encoder) get no update."""
    def label(params):
        def label_of(path, _):
            names = [getattr(p, "key", "") for p in path]
            frozen = (names[:1] == ["encoder"] and not config.encoder.finetune) or (
                names[:3] == ["decoder", "embed", "embedding"] and config.glove.freeze)
            return "frozen" if frozen else "trained"
        return jax.tree_util.tree_map_with_path(label_of, params)

    trained = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optax.scale_by_adam(),
                          optax.scale_by_learning_rate(schedule))
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, label)


def _decoder_of(captioner: Captioner, grid, tokens):
    return captioner.decoder(grid, tokens)


def init_state(model: Captioner, config, inputs_shape, embedding: np.ndarray,
               encoder_variables: dict | None, tx) -> TrainState:
    """A new run's state: the decoder drawn from ``config.seed`` with GloVe's embedding, the
    encoder's variables as loaded, Adam's moments at zero.

    Only the decoder is initialised, on a grid of the encoder's output shape: Flax draws
    each parameter from its own path, so the draws are those of initialising the whole
    captioner, whose encoder draws were thrown away (compiling them took 7.6 s of the tiny
    config's start, the decoder's alone 2 s)."""
    tokens = jnp.zeros((1, config.text.max_length - 1), jnp.int32)
    inputs = jax.ShapeDtypeStruct((1, *inputs_shape),
                                  jnp.uint8 if model.encoder is not None else jnp.float32)
    grid = inputs if model.encoder is None else jax.eval_shape(
        functools.partial(model.apply, method=Captioner.features),
        {collection: {"encoder": variables} for collection, variables
         in encoder_variables.items()}, inputs)
    rngs = {"params": jax.random.PRNGKey(config.seed), "dropout": jax.random.PRNGKey(0)}
    variables = jax.jit(lambda: model.init(rngs, jnp.zeros(grid.shape, grid.dtype), tokens,
                                           method=_decoder_of))()
    params = flax.core.unfreeze(variables["params"])
    params["decoder"]["embed"]["embedding"] = jnp.asarray(embedding)
    # A decoder variant's own state (a moving average), and the encoder's BatchNorm statistics.
    batch_stats = dict(variables.get("batch_stats", {}))
    if encoder_variables is not None:
        params["encoder"] = encoder_variables["params"]
        batch_stats["encoder"] = encoder_variables["batch_stats"]
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=jax.jit(tx.init)(params),  # one program, not one per shape
                      lr_scale=jnp.asarray(1.0, jnp.float32), nonfinite=jnp.asarray(False))


# --------------------------------------------------------------------- the steps


def model_inputs(batch):
    return batch["features"] if "features" in batch else batch["image"]


def loss_terms(model: Captioner, variables, batch, label_smoothing: float, train: bool,
               rng=None):
    """This device's share of the loss, as sums: ``(terms, counts, batch_stats)``.

    ``terms`` is ``{name: (sum, per)}``: the token cross-entropy (``ce``) and
    the decoder variant's own terms, ``per`` naming the count in ``counts``
    (``token`` or ``example``) that the sum is divided by, over all devices.
    ``batch_stats`` is the updated collection when a training step changed the
    decoder's own state (a variant's moving average), else None.
    """
    tokens = batch["tokens"]
    targets = tokens[:, 1:]
    weights = batch["weights"]
    real = (targets != PAD_ID).astype(jnp.float32)
    mask = real * weights[:, None]

    def forward(module: Captioner):
        outputs = module(model_inputs(batch), tokens[:, :-1], train=train)
        logits = outputs["logits"]
        token_logp = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        if label_smoothing:
            labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]),
                                         label_smoothing)
            ce = optax.softmax_cross_entropy(logits, labels)
        else:
            ce = -token_logp
        return {"ce": (jnp.sum(ce * mask), "token"),
                **module.losses(outputs, token_logp * real, mask, weights, train)}

    rngs = {} if rng is None else {"dropout": rng, "sample": jax.random.fold_in(rng, 1)}
    counts = {"token": jnp.sum(mask), "example": jnp.sum(weights)}
    if train and ("decoder" in variables.get("batch_stats", {}) or model.train_batchnorm):
        terms, updated = model.apply(variables, method=forward, rngs=rngs,
                                     mutable=["batch_stats"])
        return terms, counts, updated["batch_stats"]
    return model.apply(variables, method=forward, rngs=rngs), counts, None


def train_step(state: TrainState, batch, base_rng, references=None, *, model, tx,
               label_smoothing=0.0, objective: scst.Objective | None = None):
    """One update on every device. The loss is the token cross-entropy with the variant's
    own terms, or with ``objective`` SCST's policy gradient (``references``: the training
    references its reward reads)."""
    rng = jax.random.fold_in(jax.random.fold_in(base_rng, state.step),
                             jax.lax.axis_index("batch"))
    several = jax.lax.axis_size("batch") > 1

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if objective is None:
            terms, counts, batch_stats = loss_terms(model, variables, batch, label_smoothing,
                                                    True, rng)
            stats = {}
        else:
            terms, counts, batch_stats, stats = objective.terms(model, variables, batch, rng,
                                                                references)
        # Normalised by global counts, so that summing the devices' gradients gives
        # exactly the gradient of the whole batch's loss.
        totals = {per: jax.lax.stop_gradient(jax.lax.psum(n, "batch"))
                  for per, n in counts.items()}
        values = {name: value / totals[per] for name, (value, per) in terms.items()}
        means = {name: value / totals[per] for name, (value, per) in stats.items()}
        return sum(values.values()), (values, means, batch_stats)

    grads, (values, means, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if several:
        # On one device XLA still copies the whole gradient through an all-reduce.
        grads = jax.lax.psum(grads, "batch")
    values, means = jax.lax.psum((values, means), "batch")
    loss = sum(values.values())

    def update(state):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        updates = jax.tree.map(lambda u: u * state.lr_scale, updates)
        state = state.replace(params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
        if batch_stats is None:
            return state
        # A variant's own state (a moving average) is kept equal on every device; the
        # encoder's BatchNorm statistics are equal already (computed over all devices).
        updated = dict(batch_stats)
        if several and "decoder" in updated:
            updated["decoder"] = jax.lax.pmean(updated["decoder"], "batch")
        return state.replace(batch_stats={**state.batch_stats, **updated})

    # A branch, not a select of new and old state: the select is one more pass over
    # the parameters and both Adam moments, nearly as slow as Adam itself.
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    state = jax.lax.cond(finite, update, lambda state: state, state)
    state = state.replace(step=state.step + 1, nonfinite=state.nonfinite | ~finite)
    return state, {"loss": loss, **values, **means}


def eval_step(state: TrainState, batch, *, model):
    """Sums over all devices: each count, and every loss term grouped by its count."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    terms, counts, _ = loss_terms(model, variables, batch, 0.0, False)
    grouped = {per: {name: value for name, (value, p) in terms.items() if p == per}
               for per in counts}
    return jax.lax.psum({"terms": grouped, "counts": counts}, "batch")


def replicate(tree, devices=None):
    """A copy of ``tree`` on every local device (or on ``devices``), laid out as the pmapped
    steps return their state: stacked along a mesh axis named as their ``"batch"``. (Flax's
    ``replicate`` names the axis otherwise, so the second step saw another input sharding and
    compiled the train step again.) The copies are made on the host: stacking each array on
    a device compiled one small program per parameter shape, about 2 s of a tiny run."""
    devices = list(devices or jax.local_devices())
    sharding = NamedSharding(Mesh(np.asarray(devices), ("batch",)), PartitionSpec("batch"))

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x, (len(devices), *x.shape)), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first local device's copy of a replicated ``tree``, on the host (read from its
    shard: indexing the device array would compile a program per shape)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)


def shard(batch, devices: int):
    """A host batch split along its first axis into one slice per local device, as the
    pmapped steps take it."""
    return jax.tree.map(lambda x: x.reshape(devices, x.shape[0] // devices, *x.shape[1:]), batch)


# -------------------------------------------------------------------------- logs


def _tensorboardx_writer():
    """tensorboardX's ``SummaryWriter``, or None when it is not installed.

    tensorboardX imports PyTorch whenever that is installed, only to accept its tensors:
    2.2 s of every run's start. jaxcap logs floats, so PyTorch is kept out while
    tensorboardX loads (a ``None`` module makes its ``import torch`` fail)."""
    keep_out = "torch" not in sys.modules
    if keep_out:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if keep_out:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard events when tensorboardX is installed)."""

    def __init__(self, workdir: Path, resume_step: int, evaluated_epochs: int):
        self.path = workdir / "metrics.jsonl"
        self.writes = distributed.is_primary()  # one log for all processes
        self.writer = None
        if not self.writes:
            return
        if self.path.exists():
            # What a stopped run logged after the checkpoint it resumes from is logged again;
            # those lines move to metrics.jsonl.before-resume-STEP, never deleted.
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            keep = [self._keep(json.loads(line), resume_step, evaluated_epochs)
                    for line in lines]
            if not all(keep):
                with open(workdir / f"metrics.jsonl.before-resume-{resume_step}", "a") as out:
                    out.writelines(line + "\n" for line, k in zip(lines, keep) if not k)
                kept = [line for line, k in zip(lines, keep) if k]
                write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        summary_writer = _tensorboardx_writer()
        if summary_writer is not None:
            self.writer = summary_writer(str(workdir / "tensorboard"), purge_step=resume_step + 1)

    @staticmethod
    def _keep(record, step, epochs) -> bool:
        if "split" in record:  # a final test evaluation: redone when the run ends again
            return False
        return record.get("epoch", 0) <= epochs if "val_loss" in record else record["step"] <= step

    def write(self, record: dict) -> None:
        if not self.writes:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record.get("split", "val" if "val_loss" in record else "train") + "/"
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------- the loop


def selection_metric(config) -> tuple[str, str]:
    """``(key, name)`` of the validation score that picks the best checkpoint, cuts the
    rate and stops early: BLEU-4, or CIDEr-D when training on it (SCST)."""
    return ("bleu4", "BLEU-4") if first_scst_epoch(config) is None else ("cider", "CIDEr-D")


@dataclasses.dataclass
class Progress:
    """Host-side loop state saved with each checkpoint."""

    evaluated_epochs: int = 0
    best_score: float = -1.0  # of the selection metric
    epochs_since_best: int = 0
    epochs_since_cut: int = 0
    stopped_early: bool = False

    @classmethod
    def from_saved(cls, saved: dict) -> "Progress":
        saved = dict(saved)
        if "best_bleu4" in saved:  # as runs before the selection metric saved it
            saved["best_score"] = saved.pop("best_bleu4")
        return cls(**saved)

    def after_validation(self, epoch: int, score: float, lr_scale: float, config, log) -> float:
        """Takes epoch ``epoch``'s validation score (``selection_metric``); returns the
        learning-rate scale from now on.

        After ``plateau_patience`` epochs without a better score the scale is multiplied
        by ``plateau_factor`` (and again after as many more); after
        ``early_stopping_patience`` such epochs (0: never) ``stopped_early`` is set.
        """
        name = selection_metric(config)[1]
        self.evaluated_epochs = epoch + 1
        if score > self.best_score:
            self.best_score = score
            self.epochs_since_best = self.epochs_since_cut = 0
        else:
            self.epochs_since_best += 1
            self.epochs_since_cut += 1
            if self.epochs_since_cut >= config.plateau_patience:
                lr_scale *= config.plateau_factor
                self.epochs_since_cut = 0
                log(f"val {name} plateau: learning rate scaled to {lr_scale:g} of the schedule")
        if config.early_stopping_patience and \
                self.epochs_since_best >= config.early_stopping_patience:
            self.stopped_early = True
            log(f"stopping early: no better val {name} for {self.epochs_since_best} epochs")
        return lr_scale


def evaluate_split(replicated, state: TrainState, model, batcher: Batcher, index: SplitIndex,
                   vocabulary, config, p_eval) -> dict:
    """Validation loss (teacher forcing, on all devices), greedy BLEU-1..4 and CIDEr-D over a
    split.

    Each process decodes its share; the captions of all processes are gathered and
    scored on each, so all of them take the same decisions from the result."""
    devices = jax.local_device_count()
    sums = None
    images, captions = [], []
    search = CaptionSearch(model, {"params": state.params, "batch_stats": state.batch_stats},
                           vocabulary, SearchOptions(max_length=config.eval.max_length),
                           max_batch=config.eval.batch_size)
    for batch in batcher.epoch(0):
        out = unreplicate(p_eval(replicated, shard(batch, devices)))
        sums = out if sums is None else jax.tree.map(np.add, sums, out)
        captions.append(search(model_inputs(batch)).tokens)
        images.append(np.where(batch["weights"] > 0, batch["image_index"], -1))
    images = distributed.allgather(np.concatenate(images)).reshape(-1)
    captions = distributed.allgather(np.concatenate(captions))
    hypotheses = {int(image): vocabulary.decode(tokens) for image, tokens
                  in zip(images, captions.reshape(len(images), -1)) if image >= 0}
    references = {i: index.captions[i] for i in hypotheses}
    # The Python tokenizer: BLEU as pycocoevalcap's scorer computes it, without starting Java.
    scores = caption_metrics(references, hypotheses, metrics=("bleu", "cider"), tokenizer="python")
    if any(index.objects):  # a grounded dataset: which objects the captions name, right or not
        scores.update(object_metrics(
            list(hypotheses.values()),
            [[(o["colour"], o["shape"]) for o in index.objects[i]] for i in hypotheses]))
    loss = sum(float(value) / max(float(sums["counts"][per]), 1.0)
               for per, terms in sums["terms"].items() for value in terms.values())
    return {"val_loss": loss, **scores, "examples": dict(list(hypotheses.items())[:3])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) the run in ``workdir``; returns the last validation metrics."""
    workdir = Path(workdir).expanduser().absolute()
    primary = distributed.is_primary()
    log = functools.partial(print, file=sys.stderr) if primary else lambda *_: None
    check_settings(config)
    _check_batch_sizes(config)
    _as_started(config, workdir, log)  # before anything reads the settings it restores
    if config.objective not in ("cross_entropy", "scst"):
        raise TrainingError(f"objective must be cross_entropy or scst, got {config.objective!r}")
    scst_from = first_scst_epoch(config)
    objective = None
    if scst_from is not None:
        try:
            objective = scst.Objective.from_config(config)
        except ValueError as error:
            raise TrainingError(f"{error} (in the config's scst section)") from None

    def prepare():
        """What the run reads, built where absent (idempotent and deterministic)."""
        workdir.mkdir(parents=True, exist_ok=True)
        if config.objective == "scst":
            _start_from_run(config, workdir, log)
        _check_config(config, workdir)
        if not (workdir / "config.json").exists():  # a new run: what it builds is known now
            _write_config(config, workdir)
        built = prepare_dataset(config)
        train_index = SplitIndex(built.as_data_source("train"))
        vocabulary_path = workdir / "vocabulary.json"
        if vocabulary_path.exists():
            vocabulary = Vocabulary.load(vocabulary_path)
        else:
            vocabulary = Vocabulary.build((c for caps in train_index.captions for c in caps),
                                          config.text.min_count)
            vocabulary.save(vocabulary_path)
        encoder_dir = prepare_encoder(config, workdir)
        features = ((prepare_features(config, built, encoder_dir, "train"),
                     prepare_features(config, built, encoder_dir, "val"))
                    if config.encoder.mode == "features" else (None, None))
        return built, train_index, vocabulary, encoder_dir, features

    built, train_index, vocabulary, encoder_dir, (train_features, val_features) = \
        distributed.primary_first("prepared", prepare)
    sources = built.as_data_source()
    embedding, coverage = glove.embedding_matrix(vocabulary, glove.load(config.glove.source),
                                                 seed=config.seed)
    log(f"vocabulary: {len(vocabulary)} tokens; {coverage.report()}")

    encoder_metadata, encoder_variables = load_encoder(encoder_dir)
    model = make_model(config, len(vocabulary), encoder_metadata)
    devices = jax.local_device_count()
    options, eval_options = pipeline_options(config)
    inputs_shape = (train_features.shape if train_features is not None else
                    (config.encoder.image_size, config.encoder.image_size, 3))
    train_batches = Batcher(sources["train"], vocabulary, options, train_features, train_index)
    val_batches = Batcher(sources["val"], vocabulary, eval_options, val_features)
    val_index = val_batches.index

    steps_per_epoch = train_batches.num_batches()
    if steps_per_epoch == 0:
        raise TrainingError(f"the training split has fewer examples than one batch "
                            f"({config.batch_size})")
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)
    schedule = learning_rate_schedule(config, total_steps, steps_per_epoch)
    tx = make_optimizer(config, schedule)
    state = init_state(model, config, inputs_shape, embedding,
                       encoder_variables if model.encoder is not None else None, tx)
    references = None if objective is None else replicate(
        scst.training_references(train_index.captions, vocabulary))

    metric = selection_metric(config)[0]
    checkpoints = Checkpoints(workdir, config.keep_checkpoints, metric)
    progress = Progress()
    try:
        restored = checkpoints.restore_latest(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                           state))
    except BaseException:
        checkpoints.close()
        raise
    if restored is not None:
        state, saved_progress = restored
        progress = Progress.from_saved(saved_progress)
        log(f"resumed from step {int(state.step)} in {workdir}")
    elif config.objective == "scst":
        state = _initial_scst_state(state, Path(config.init_from).expanduser().absolute(), tx,
                                    config.keep_checkpoints, log)
    start_step = int(state.step)
    if primary:
        _write_config(config, workdir)
        write_run_info(workdir, state.params)
    metrics_log = MetricsLog(workdir, start_step, progress.evaluated_epochs)

    def pmapped_step(objective):
        return jax.pmap(functools.partial(train_step, model=model, tx=tx,
                                          label_smoothing=config.decoder.label_smoothing,
                                          objective=objective),
                        axis_name="batch", donate_argnums=(0,))
    p_cross_entropy = pmapped_step(None) if scst_from != 0 else None
    p_scst = pmapped_step(objective) if objective is not None else None
    p_eval = jax.pmap(functools.partial(eval_step, model=model), axis_name="batch")
    base_rng = replicate(jax.random.PRNGKey(config.seed + 1))
    replicated = replicate(state)
    del state

    def host_state():
        return unreplicate(replicated)

    def check_finite(step):
        if bool(unreplicate(replicated.nonfinite)):
            raise TrainingError(
                f"the loss became NaN or Inf before step {step}; that update was not applied "
                f"and no checkpoint of it was written. Lower learning_rate or check the data; "
                f"rerunning resumes from the last checkpoint in {workdir}/checkpoints.")

    last_val: dict = {}
    step = start_step
    bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr, desc="train",
               disable=not primary)
    interval = {"sums": None, "count": 0, "start": time.perf_counter()}
    try:
        while step < total_steps and not progress.stopped_early:
            epoch, first = divmod(step, steps_per_epoch)
            by_scst = scst_from is not None and epoch >= scst_from
            p_train = p_scst if by_scst else p_cross_entropy
            switches_next = scst_from is not None and epoch + 1 == scst_from
            for batch in train_batches.epoch(epoch, first):
                replicated, metrics = p_train(replicated, shard(batch, devices), base_rng,
                                              references)
                step += 1
                # Summed on the devices (every one holds the same values): no wait here.
                interval["sums"] = metrics if interval["sums"] is None else jax.tree.map(
                    jnp.add, interval["sums"], metrics)
                interval["count"] += 1
                bar.update(1)
                at_epoch_end = step % steps_per_epoch == 0 or step == total_steps
                # The objective's metrics differ: an interval ends where it changes.
                if step % config.log_every_steps == 0 or step == total_steps or (
                        at_epoch_end and switches_next):
                    check_finite(step)
                    elapsed = time.perf_counter() - interval["start"]
                    record = {"step": step, "epoch": epoch,
                              **{k: float(v) / interval["count"]
                                 for k, v in unreplicate(interval["sums"]).items()},
                              "learning_rate": float(schedule(step - 1)) *
                              float(unreplicate(replicated.lr_scale)),
                              "captions_per_s": interval["count"] * config.batch_size / elapsed}
                    metrics_log.write(record)
                    shown = "reward" if by_scst else "loss"
                    bar.set_postfix({shown: f"{record[shown]:.3f}",
                                     "captions_per_s": f"{record['captions_per_s']:.0f}"})
                    interval = {"sums": None, "count": 0, "start": time.perf_counter()}
                if step % config.checkpoint_every_steps == 0 and not at_epoch_end:
                    check_finite(step)
                    checkpoints.save(host_state(), dataclasses.asdict(progress))
                if at_epoch_end:
                    break
            if step % steps_per_epoch == 0 or step == total_steps:
                check_finite(step)
                last_val, lr_scale = _end_of_epoch(
                    step, epoch, model, val_batches, val_index, vocabulary, config, p_eval,
                    progress, checkpoints, metrics_log, replicated, host_state(), log)
                replicated = replicated.replace(
                    lr_scale=jnp.full_like(replicated.lr_scale, lr_scale))
        if "test" in sources and len(sources["test"]):
            best = checkpoints.restore_best(jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                         host_state()))
            test_features = (distributed.primary_first("test features", functools.partial(
                prepare_features, config, built, encoder_dir, "test"))
                if config.encoder.mode == "features" else None)
            test_batches = Batcher(sources["test"], vocabulary, eval_options, test_features)
            metrics = evaluate_split(replicate(best), best, model, test_batches,
                                     test_batches.index, vocabulary, config, p_eval)
            metrics.pop("examples")
            last_val = {"step": int(best.step), "split": "test",
                        **{f"test_{k}": v for k, v in metrics.items()}}
            metrics_log.write(last_val)
            log(f"test split, best checkpoint (step {int(best.step)}): "
                f"BLEU-4 {metrics['bleu4']:.4f}")
    finally:
        bar.close()
        checkpoints.close()
        metrics_log.close()
    return last_val


def _initial_scst_state(state: TrainState, run: Path, tx, keep: int, log) -> TrainState:
    """The state SCST starts from: the best parameters (and statistics) of ``run``, a new
    optimizer, step 0."""
    source = Checkpoints(run, keep,
                         selection_metric(ml_collections.ConfigDict(read_saved_config(run)))[0])
    try:
        best = source.restore_best(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    finally:
        source.close()
    log(f"starting from the best checkpoint of {run} (step {int(best.step)})")
    return state.replace(params=best.params, batch_stats=best.batch_stats,
                         opt_state=tx.init(best.params))


def _end_of_epoch(step, epoch, model, val_batches, val_index, vocabulary, config, p_eval,
                  progress: Progress, checkpoints: Checkpoints, metrics_log, replicated,
                  state: TrainState, log) -> tuple[dict, float]:
    """Validation, the best checkpoint, plateau cut and early stop, the epoch's checkpoint.

    Returns the validation record and the learning-rate scale from now on.
    """
    metrics = evaluate_split(replicated, state, model, val_batches, val_index, vocabulary, config,
                             p_eval)
    examples = metrics.pop("examples")
    metric = selection_metric(config)[0]
    lr_scale = progress.after_validation(epoch, metrics[metric], float(state.lr_scale),
                                         config, log)
    state = state.replace(lr_scale=np.asarray(lr_scale, np.float32))
    if progress.epochs_since_best == 0:
        checkpoints.save_best(state, dataclasses.asdict(progress), metrics[metric])
    record = {"step": step, "epoch": epoch + 1, **metrics, f"best_{metric}": progress.best_score,
              "lr_scale": lr_scale}
    metrics_log.write(record)
    log(f"epoch {epoch + 1}: val loss {metrics['val_loss']:.4f}, BLEU-4 {metrics['bleu4']:.4f}, "
        f"CIDEr-D {metrics['cider']:.4f}; e.g. {next(iter(examples.values()), '')!r}")
    checkpoints.save(state, dataclasses.asdict(progress))
    return record, lr_scale


def main(args) -> int:
    """``jaxcap train``: see ``jaxcap.cli``."""
    if args.distributed:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.coordinator or args.num_processes or args.process_id is not None:
        raise TrainingError("--coordinator, --num-processes and --process-id need --distributed")
    config = configs.override(configs.load(args.config), args.overrides)
    metrics = train_and_evaluate(config, args.workdir)
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}))
    return 0
