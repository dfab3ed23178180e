"""Decoding captions inside ``jax.jit``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcap.data.text import END_ID, PAD_ID, START_ID
from jaxcap.models.captioner import Captioner


def _words_only(logits):
    """<pad> and <start> are never emitted as words."""
    return logits.at[..., PAD_ID].set(-jnp.inf).at[..., START_ID].set(-jnp.inf)


@functools.partial(jax.jit, static_argnames=("model", "max_length"))
def greedy(model: Captioner, variables, inputs, max_length: int):
    """Greedy decoding: tokens (B, max_length) starting with ``<start>``, ``<pad>`` after
    ``<end>``; and attention weights (B, max_length - 1, P) of every emitted word (zero
    after ``<end>``)."""
    regions, projected, carry = model.apply(variables, inputs, method=Captioner.start)
    batch = regions.shape[0]

    def step(state, _):
        carry, token, done = state
        carry, logits, alpha = model.apply(variables, token, carry, projected, regions,
                                           method=Captioner.decode_step)
        token = jnp.where(done, PAD_ID, jnp.argmax(_words_only(logits), axis=-1).astype(jnp.int32))
        alpha = jnp.where(done[:, None], 0.0, alpha)  # no word emitted, no attention recorded
        return (carry, token, done | (token == END_ID)), (token, alpha)

    start = jnp.full((batch,), START_ID, jnp.int32)
    _, (tokens, alphas) = jax.lax.scan(step, (carry, start, jnp.zeros(batch, bool)), None,
                                       length=max_length - 1)
    return jnp.concatenate([start[:, None], tokens.T], axis=1), alphas.transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_length", "min_length",
                                             "length_penalty"))
def beam_search(model: Captioner, variables, inputs, beam_size: int, max_length: int,
                min_length: int = 1, length_penalty: float = 0.0):
    """Batched beam search over images and beams together, in one ``lax.while_loop``.

    Returns ``(tokens (B, max_length), score (B,), alphas (B, max_length - 1, P))`` of each
    image's best hypothesis. Ranking during the search uses the summed log-probability;
    the final choice divides it by ``length ** length_penalty`` (0: none). Finished
    beams carry forward unchanged; when no beam of an image has ended by
    ``max_length`` its best unfinished hypothesis is returned. The loop stops as soon
    as every beam of every image has ended. The feature grid is shared by an image's
    beams (``vmap`` over the beam axis with the grid unbatched), never copied per beam.
    """
    regions, projected, (h, c) = model.apply(variables, inputs, method=Captioner.start)
    batch, regions_count = regions.shape[0], regions.shape[1]
    k = beam_size

    def beam_step(tokens, carry):
        # tokens (K, B), carry (K, B, H) -> logits (K, B, V), alpha (K, B, P)
        return jax.vmap(lambda t, cr: model.apply(variables, t, cr, projected, regions,
                                                  method=Captioner.decode_step),
                        in_axes=(0, 0))(tokens, carry)

    tokens = jnp.full((k, batch, max_length), PAD_ID, jnp.int32).at[:, :, 0].set(START_ID)
    scores = jnp.where(jnp.arange(k)[:, None] == 0, 0.0, -jnp.inf) * jnp.ones((k, batch))
    carry = (jnp.broadcast_to(h, (k, *h.shape)), jnp.broadcast_to(c, (k, *c.shape)))
    state = dict(t=jnp.asarray(1), tokens=tokens, scores=scores, carry=carry,
                 done=jnp.zeros((k, batch), bool), lengths=jnp.ones((k, batch), jnp.int32),
                 alphas=jnp.zeros((k, batch, max_length - 1, regions_count), jnp.float32))

    def cond(state):
        return (state["t"] < max_length) & ~jnp.all(state["done"])

    def body(state):
        t = state["t"]
        carry, logits, alpha = beam_step(state["tokens"][:, :, t - 1], state["carry"])
        logp = jax.nn.log_softmax(_words_only(logits), axis=-1)  # (K, B, V)
        logp = jnp.where((t < min_length) & (jnp.arange(logp.shape[-1]) == END_ID), -jnp.inf, logp)
        # A finished beam only extends with <pad> at no cost.
        pad_only = jnp.where(jnp.arange(logp.shape[-1]) == PAD_ID, 0.0, -jnp.inf)
        logp = jnp.where(state["done"][..., None], pad_only, logp)
        vocab = logp.shape[-1]
        candidates = (state["scores"][..., None] + logp).transpose(1, 0, 2).reshape(batch, k * vocab)
        scores, flat = jax.lax.top_k(candidates, k)  # (B, K)
        source, token = (flat // vocab).T, (flat % vocab).T.astype(jnp.int32)  # (K, B)

        def pick(x):  # gather along the beam axis (0) per image
            return jnp.take_along_axis(x, source.reshape(k, batch, *([1] * (x.ndim - 2))), axis=0)

        done = pick(state["done"])
        tokens = pick(state["tokens"]).at[:, :, t].set(token)
        alphas = pick(state["alphas"]).at[:, :, t - 1].set(
            jnp.where(done[..., None], 0.0, pick(alpha)))
        return dict(t=t + 1, tokens=tokens, scores=scores.T,
                    carry=jax.tree.map(pick, carry), done=done | (token == END_ID),
                    lengths=pick(state["lengths"]) + (~done).astype(jnp.int32), alphas=alphas)

    state = jax.lax.while_loop(cond, body, state)
    normalized = state["scores"] / state["lengths"].astype(jnp.float32) ** length_penalty
    # Prefer ended hypotheses; an image none of whose beams ended keeps its best unfinished one.
    any_done = jnp.any(state["done"], axis=0)
    ranked = jnp.where(state["done"] | ~any_done[None, :], normalized, -jnp.inf)
    best = jnp.argmax(ranked, axis=0)  # (B,)
    take = lambda x: jnp.take_along_axis(  # noqa: E731
        x, best.reshape(1, batch, *([1] * (x.ndim - 2))), axis=0)[0]
    return take(state["tokens"]), take(state["scores"]), take(state["alphas"])
