"""Continuous batching: a stream of images decoded through a fixed number of slots.

A slot holds one image's search: its beams, or its one caption for greedy decoding and
sampling. ``advance`` admits waiting images into free slots (their ``start`` and first
step), runs ``chunk`` steps of every slot, each at its own position, and gives back
the slots whose image has settled (``decode._settled``: the moment ``beam_search`` would
return the same caption) or reached the maximum length, freeing them for the next images.
A step is then never spent on a caption that can no longer change, save at most
``chunk - 1`` an image, where a batch search runs every image until its last one
settles. The shapes stay static (the slots, the chunk, the images admitted at once), so
the decoding program compiles once.

``ContinuousSearch`` is ``CaptionSearch`` over a stream: the images are read, encoded
and started in blocks as slots free up for them, then decoded through the slots;
captions, scores and attention come back in the images' order, the same as
``CaptionSearch``'s for every image, whatever the slot count, the chunk or the order of
the images (tested).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcap.data.text import END_ID, PAD_ID
from jaxcap.decode import (Captions, SearchOptions, _first_beams, _next_word_logp, _ranked,
                           _settled, _top_k_cut, best_continuations, continued)
from jaxcap.models.captioner import Captioner


@flax.struct.dataclass
class Slots:
    """Every slot's search; K beams (1 without beam search), S slots, L tokens at most."""

    image: jnp.ndarray  # (S,) the image's index in the stream; -1: free
    t: jnp.ndarray  # (S,) the position its next word is written at
    tokens: jnp.ndarray  # (K, S, L)
    scores: jnp.ndarray  # (K, S) summed log-probabilities
    done: jnp.ndarray  # (K, S)
    lengths: jnp.ndarray  # (K, S) words and <end>
    alphas: jnp.ndarray  # (K, S, L - 1, P)
    carry: Any  # the decoder's state, (K, S, ...) leaves
    context: Any  # what the decoder's steps read, (S, ...) leaves
    keys: jnp.ndarray  # (S, 2) sampling: the image's random stream


def _first_sample(model, variables, context, carry, keys, max_length: int, min_length,
                  no_repeat_ngram: int, temperature, top_k) -> dict:
    """A sampled caption's state after its first word, as ``decode._word_by_word`` takes it."""
    batch = keys.shape[0]
    tokens = jnp.full((batch, max_length), PAD_ID, jnp.int32).at[:, 0].set(1)
    carry, logits, alpha = model.apply(variables, context, carry, tokens[:, 0],
                                       method=Captioner.decode_step)
    logp = _next_word_logp(logits, tokens, 1, min_length, no_repeat_ngram)
    token = _draw(keys, jnp.ones(batch, jnp.int32), logp, temperature, top_k)
    score = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
    alphas = jnp.zeros((1, batch, max_length - 1, alpha.shape[-1]), jnp.float32)
    return dict(tokens=tokens.at[:, 1].set(token)[None], scores=score[None],
                carry=jax.tree.map(lambda x: x[None], carry), done=(token == END_ID)[None],
                lengths=jnp.ones((1, batch), jnp.int32),
                alphas=alphas.at[0, :, 0].set(alpha))


def _draw(keys, t, logp, temperature, top_k):
    """Each row's word drawn from its own stream at its position, as ``_word_by_word``."""
    return jax.vmap(lambda key, step, row: jax.random.categorical(
        jax.random.fold_in(key, step), _top_k_cut(row / temperature, top_k)))(
            keys, t, logp).astype(jnp.int32)


def _admit(model, variables, slots: Slots, context, carry, images, count, seed, min_length,
           temperature, top_k, sampling: bool, max_length: int, no_repeat_ngram: int) -> Slots:
    """The first ``count`` of the A started images (``context`` and ``carry``: ``start``'s,
    (A, ...) leaves; ``images`` (A,) their indices in the stream) in the first free slots,
    their first step taken."""
    admit, slot_count = images.shape[0], slots.image.shape[0]
    free = jnp.nonzero(slots.image < 0, size=admit, fill_value=slot_count)[0]
    target = jnp.where(jnp.arange(admit) < count, free, slot_count)  # out of range: dropped
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
        images.astype(jnp.uint32))
    if sampling:
        new = _first_sample(model, variables, context, carry, keys, max_length, min_length,
                            no_repeat_ngram, temperature, top_k)
    else:
        new = _first_beams(model, variables, context, carry, admit, slots.scores.shape[0],
                           max_length, min_length, no_repeat_ngram)

    def put(old, value, axis):  # value's rows into the target slots along ``axis``
        if old.ndim <= axis:  # not per image (a variant's constant): the same for all
            return old
        index = (slice(None),) * axis + (target,)
        return old.at[index].set(value.astype(old.dtype), mode="drop")

    return slots.replace(
        image=put(slots.image, images, 0), t=put(slots.t, jnp.full(admit, 2), 0),
        keys=put(slots.keys, keys, 0),
        context=jax.tree.map(lambda old, value: put(old, value, 0), slots.context, context),
        carry=jax.tree.map(lambda old, value: put(old, value, 1), slots.carry, new["carry"]),
        **{name: put(getattr(slots, name), new[name], 1)
           for name in ("tokens", "scores", "done", "lengths", "alphas")})


def _step(model, variables, slots: Slots, context, min_length, temperature, top_k,
          sampling: bool, no_repeat_ngram: int) -> Slots:
    """One word of every slot at its own position; a slot past the maximum length stays."""
    k, count, max_length = slots.tokens.shape
    t = slots.t
    stepping = t < max_length
    # Positions as masks over the (short) token axis rather than gathers and scatters at
    # per-slot indices: elementwise work that XLA fuses (the two measured alike here).
    at_t = jnp.arange(max_length) == t[:, None]  # (S, L); no position once t is past the end
    previous = jnp.sum(jnp.where(jnp.arange(max_length) == t[:, None] - 1, slots.tokens, 0),
                       axis=-1)
    carry, logits, alpha = jax.vmap(lambda word, state: model.apply(
        variables, context, state, word, method=Captioner.decode_step))(previous, slots.carry)
    vocab = logits.shape[-1]
    logp = _next_word_logp(logits.reshape(k * count, vocab),
                           slots.tokens.reshape(k * count, max_length),
                           jnp.broadcast_to(t, (k, count)).reshape(-1), min_length,
                           no_repeat_ngram).reshape(k, count, vocab)
    # A finished beam, or a slot that stays, only extends with <pad> at no cost: its beams
    # keep their order (they are sorted by score), so nothing of it changes.
    still = slots.done | ~stepping[None]
    logp = jnp.where(still[..., None], jnp.where(jnp.arange(vocab) == PAD_ID, 0.0, -jnp.inf),
                     logp)
    if sampling:
        token = jnp.where(still[0], PAD_ID, _draw(slots.keys, t, logp[0], temperature, top_k))
        source, token, scores = (jnp.zeros((1, count), jnp.int32), token[None],
                                 slots.scores + jnp.take_along_axis(logp[0], token[:, None],
                                                                    axis=1)[:, 0])
    else:
        source, token, scores = best_continuations(slots.scores, logp)
    pick = functools.partial(continued, source)
    done = pick(slots.done)
    alpha = jnp.where(done[..., None], 0.0, pick(alpha))
    # A slot that stays keeps its beams' order (source is the identity), so its words,
    # scores and attention stay; its carry changes, but it is never read again.
    return slots.replace(
        t=jnp.where(stepping, t + 1, t), scores=scores, carry=jax.tree.map(pick, carry),
        done=done | (token == END_ID),
        lengths=pick(slots.lengths) + (~done & stepping[None]).astype(jnp.int32),
        tokens=jnp.where(at_t[None], token[..., None], pick(slots.tokens)),
        alphas=jnp.where(at_t[None, :, 1:, None], alpha[:, :, None, :], pick(slots.alphas)))


def _emit(slots: Slots, length_penalty):
    """The slots whose image is settled or at the maximum length: ``(image (S,), -1 where
    not; tokens, scores, alphas of each one's answer)``, and those slots freed."""
    max_length = slots.tokens.shape[2]
    finished = (slots.image >= 0) & (
        (slots.t >= max_length) |
        _settled(slots.scores, slots.lengths, slots.done, max_length, length_penalty))
    normalized = _ranked(slots.scores, slots.lengths, length_penalty)
    any_done = jnp.any(slots.done, axis=0)
    best = jnp.argmax(jnp.where(slots.done | ~any_done[None], normalized, -jnp.inf), axis=0)

    def take(x):
        return jnp.take_along_axis(x, best.reshape(1, -1, *([1] * (x.ndim - 2))), axis=0)[0]

    emitted = (jnp.where(finished, slots.image, -1), take(slots.tokens), take(slots.scores),
               take(slots.alphas))
    return slots.replace(image=jnp.where(finished, -1, slots.image),
                         t=jnp.where(finished, max_length, slots.t)), emitted


@functools.partial(jax.jit, static_argnames=("model", "sampling", "max_length",
                                             "no_repeat_ngram", "chunk"), donate_argnums=(2,))
def advance(model: Captioner, variables, slots: Slots, started, images, count, arguments,
            *, sampling: bool, max_length: int, no_repeat_ngram: int, chunk: int):
    """Admits the first ``count`` of the images ``started`` (their ``start`` state, ``(context,
    carry)`` of A rows; ``images`` (A,) their indices in the stream) into free slots, runs
    ``chunk`` steps, and returns ``(slots, emitted)``: ``_emit``'s. ``arguments``: the
    search's traced options ``(seed, min_length, temperature, top_k, length_penalty)``."""
    seed, min_length, temperature, top_k, length_penalty = arguments
    slots = jax.lax.cond(count > 0, lambda s: _admit(
        model, variables, s, *started, images, count, seed, min_length, temperature, top_k,
        sampling, max_length, no_repeat_ngram), lambda s: s, slots)
    # The context (the slots' grids, most of their bytes) is read by the steps, not
    # carried through the loop: carried, XLA copied it at every step.
    context = slots.context
    slots = jax.lax.fori_loop(0, chunk, lambda _, s: _step(
        model, variables, s, context, min_length, temperature, top_k, sampling,
        no_repeat_ngram), slots.replace(context=None))
    return _emit(slots.replace(context=context), length_penalty)


@functools.partial(jax.jit, static_argnames=("model", "max_length"))
def _start(model: Captioner, variables, inputs, *, max_length: int):
    """``start``'s ``(context, carry)`` of a block of inputs (images: the encoder first)."""
    return model.apply(variables, inputs, max_length, method=Captioner.start)


class ContinuousSearch:
    """Captions a stream of images through ``slots`` slots, ``chunk`` steps between the
    boundaries where finished images leave and waiting ones enter (at most ``admit`` at a
    time). Same interface and results as ``CaptionSearch``."""

    def __init__(self, model: Captioner, variables, vocabulary, options: SearchOptions,
                 slots: int = 64, chunk: int = 4, admit: int | None = None):
        self.model, self.vocabulary, self.options = model, vocabulary, options
        self.slots, self.chunk = slots, chunk
        # Enough to refill the slots as fast as short captions free them.
        self.admit = min(slots, admit or max(1, slots // 2))
        self.variables = variables
        # The steps run on the started state: the encoder's variables stay out of them.
        self.decoder = Captioner(model.decoder)
        self.decoder_variables = {collection: {"decoder": tree["decoder"]}
                                  for collection, tree in variables.items() if "decoder" in tree}
        o = options
        self.beams = 1 if o.temperature > 0 else o.beam_size
        self.arguments = (np.uint32(o.seed), np.int32(o.min_length), np.float32(o.temperature),
                          np.int32(o.top_k), np.float32(o.length_penalty))
        self.static = dict(sampling=o.temperature > 0, max_length=o.max_length,
                           no_repeat_ngram=o.no_repeat_ngram, chunk=chunk)

    def _start_block(self, block: list) -> tuple:
        """``(layout, entries)``: each input of ``block`` (at most ``admit``) as the leaves
        of its ``start`` state (None for a leaf that is not per image), and the state's
        layout (its tree, and the leaves shared by all images). The block runs as one padded block of
        ``admit``: one program for the encoder and the start run, however images arrive,
        and each image's grid projected once."""
        padded = np.stack(block + block[:1] * (self.admit - len(block)))
        leaves, treedef = jax.tree.flatten(_start(
            self.model, self.variables, padded, max_length=self.options.max_length))
        leaves = [np.asarray(x) for x in leaves]
        layout = (treedef, [None if x.ndim else x for x in leaves])
        return layout, [[x[i] if x.ndim else None for x in leaves] for i in range(len(block))]

    @staticmethod
    def _stacked(layout: tuple, entries: list, rows: int):
        """The ``(context, carry)`` of ``entries`` (``_start_block``'s) in ``rows`` rows,
        zeros after them."""
        leaves = [constant if constant is not None else np.concatenate([
            np.stack([entry[i] for entry in entries]),
            np.zeros((rows - len(entries), *entries[0][i].shape), entries[0][i].dtype)])
            for i, constant in enumerate(layout[1])]
        return jax.tree.unflatten(layout[0], leaves)

    def _empty(self, layout: tuple, entry: list) -> Slots:
        """Free slots of the right shapes (their contents never read), from one entry."""
        context, carry = self._stacked(layout, [entry], self.slots)
        k, count, length = self.beams, self.slots, self.options.max_length
        regions = jax.eval_shape(lambda: self.decoder.apply(
            self.decoder_variables, context, carry, jnp.zeros(count, jnp.int32),
            method=Captioner.decode_step))[2].shape[-1]
        slots = Slots(image=jnp.full(count, -1, jnp.int32), t=jnp.full(count, length, jnp.int32),
                      tokens=jnp.zeros((k, count, length), jnp.int32),
                      scores=jnp.zeros((k, count), jnp.float32),
                      done=jnp.ones((k, count), bool), lengths=jnp.ones((k, count), jnp.int32),
                      alphas=jnp.zeros((k, count, length - 1, regions), jnp.float32),
                      carry=jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), carry),
                      context=context, keys=jnp.zeros((count, 2), jnp.uint32))
        return self._spread(slots)

    def _spread(self, slots: Slots) -> Slots:
        """The slots split over every local device (where their count allows), the
        variables on each: each device steps its share of the slots."""
        devices = jax.local_devices()
        if len(devices) == 1 or self.slots % len(devices):
            return slots
        mesh = Mesh(np.asarray(devices), ("slots",))

        def put(x, axis):
            spec = [None] * x.ndim
            if x.ndim > axis:  # per slot (a variant's constant is on every device)
                spec[axis] = "slots"
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

        self.decoder_variables = jax.device_put(self.decoder_variables,
                                                NamedSharding(mesh, PartitionSpec()))
        per_beam = {"tokens", "scores", "done", "lengths", "alphas", "carry"}
        return slots.replace(**{name: jax.tree.map(lambda x, axis=1 if name in per_beam else 0:
                                                   put(x, axis), getattr(slots, name))
                                for name in ("image", "t", "keys", "context", *per_beam)})

    def __call__(self, inputs: np.ndarray, first_index: int = 0) -> Captions:
        if not len(inputs):
            raise ValueError("no inputs to caption")
        found = [answer for _, *answer in self.stream(enumerate(inputs), first_index)]
        tokens, scores, alphas = (np.stack(parts) for parts in zip(*found))
        return Captions(tokens, [self.vocabulary.decode(row) for row in tokens], scores, alphas)

    def stream(self, items, first_index: int = 0):
        """``(key, tokens, score, alphas)`` of every ``(key, input)`` of ``items`` (an
        iterable, read as slots free up for it), in the order of ``items``. Image i of the
        stream samples from ``fold_in(PRNGKey(seed), first_index + i)``."""
        items = iter(items)
        slots, idle, ready, keys, finished = None, None, [], {}, {}
        free, entered, given, exhausted = self.slots, 0, 0, False
        while True:
            if len(ready) < min(free, self.admit) and not exhausted:
                block = list(itertools.islice(items, self.admit))
                exhausted = len(block) < self.admit
                if block:
                    names, inputs = zip(*block)
                    layout, entries = self._start_block(list(inputs))
                    ready += zip(names, entries)
            count = min(free, self.admit, len(ready))
            if not ready and given == entered:
                return  # every image that entered has been given back, and none waits
            if slots is None:
                slots = self._empty(layout, ready[0][1])
                # for boundaries with no entry
                idle = self._stacked(layout, [ready[0][1]], self.admit)
            started = (self._stacked(layout, [entry for _, entry in ready[:count]], self.admit)
                       if count else idle)
            images = np.arange(first_index + entered, first_index + entered + self.admit,
                               dtype=np.int32)
            slots, emitted = advance(self.decoder, self.decoder_variables, slots, started,
                                     images, np.int32(count), self.arguments, **self.static)
            keys.update({entered + i: key for i, (key, _) in enumerate(ready[:count])})
            entered, free, ready = entered + count, free - count, ready[count:]
            image, tokens, scores, alphas = (np.asarray(x) for x in emitted)
            for row in np.flatnonzero(image >= 0):
                finished[int(image[row]) - first_index] = (tokens[row], scores[row], alphas[row])
            free += int(np.sum(image >= 0))
            while given in finished:  # in the order of the items
                yield (keys.pop(given), *finished.pop(given))
                given += 1
