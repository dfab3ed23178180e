"""Decoding captions inside ``jax.jit``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcap.data.text import END_ID, PAD_ID, START_ID
from jaxcap.models.captioner import Captioner


@functools.partial(jax.jit, static_argnames=("model", "max_length"))
def greedy(model: Captioner, variables, inputs, max_length: int):
    """Greedy decoding: tokens (B, max_length) starting with ``<start>``, ``<pad>`` after
    ``<end>``; and attention weights (B, max_length - 1, P) of every emitted word."""
    regions, projected, carry = model.apply(variables, inputs, method=Captioner.start)
    batch = regions.shape[0]

    def step(state, _):
        carry, token, done = state
        carry, logits, alpha = model.apply(variables, token, carry, projected, regions,
                                           method=Captioner.decode_step)
        token = jnp.where(done, PAD_ID, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        done = done | (token == END_ID)
        return (carry, token, done), (token, alpha)

    start = jnp.full((batch,), START_ID, jnp.int32)
    _, (tokens, alphas) = jax.lax.scan(step, (carry, start, jnp.zeros(batch, bool)), None,
                                       length=max_length - 1)
    return jnp.concatenate([start[:, None], tokens.T], axis=1), alphas.transpose(1, 0, 2)
