"""The jitted steps, on every local device (``jax.pmap``, axis ``batch``): the loss terms
(token cross-entropy and the decoder variant's own), the train step (SCST's objective in
place of the cross-entropy where it trains), the evaluation step, and moving state and
batches to and from the devices.

Each term is normalised by a *global* count of tokens or examples, so 4 devices give
exactly the update of 1 device on the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcap import scst
from jaxcap.data.pipeline import model_inputs
from jaxcap.data.text import PAD_ID
from jaxcap.models.captioner import Captioner
from jaxcap.train.state import TrainState


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
