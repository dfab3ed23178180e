"""The train state and what updates it: the learning-rate schedule, Adam with clipping, and
a new run's initial state (or an SCST run's, from the run it continues)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxcap.checkpoints import Checkpoints
from jaxcap.models.captioner import Captioner
from jaxcap.runs import first_scst_epoch, read_saved_config, selection_metric
from jaxcap.train.settings import TrainingError


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    lr_scale: jnp.ndarray  # cut on a validation plateau
    nonfinite: jnp.ndarray  # a NaN/Inf loss was seen; that update was not applied


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


def initial_scst_state(state: TrainState, run: Path, tx, keep: int, log) -> TrainState:
    """The state SCST starts from: the best parameters (and statistics) of ``run``, a new
    optimizer, step 0."""
    source = Checkpoints(run, keep, selection_metric(read_saved_config(run))[0])
    try:
        best = source.restore_best(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    finally:
        source.close()
    log(f"starting from the best checkpoint of {run} (step {int(best.step)})")
    return state.replace(params=best.params, batch_stats=best.batch_stats,
                         opt_state=tx.init(best.params))
