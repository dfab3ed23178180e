"""Decoding captions inside ``jax.jit``.

Three searches over the decoder's single step (``Captioner.decode_step``), each
one ``lax.while_loop`` that stops as soon as every caption has ended:

* ``greedy``: the most likely word at each step;
* ``sample``: a word drawn from the temperature-scaled distribution, cut to its
  ``top_k`` words; every image has its own random stream, so its caption does
  not depend on the batch it was decoded in;
* ``beam_search``: ``beam_size`` hypotheses per image, batched over images and
  beams together.

All three take a minimum length and block repeated n-grams, and return the
tokens, the summed log-probability of the emitted words and the attention
weights of every emitted word. What sets the shapes of a search is static (a
program per value: the beam size, the maximum length, the n-gram size blocked);
every other option is an argument of the program (minimum length, top-k,
temperature, length penalty, seed).

``CaptionSearch`` is what the commands use: it pads a batch of any size to one
of a few bucket sizes (so a new number of images does not compile again),
shards it over the local devices and returns text with the arrays; it can also
compile its programs ahead of time and hold them itself (``compile``), so that
a server decides which programs it keeps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcap.data.text import END_ID, PAD_ID, START_ID, Vocabulary
from jaxcap.models.captioner import Captioner


def word_logp(logits):
    """The model's log-probabilities of the next word (..., V): ``<pad>`` and ``<start>``
    are never words."""
    vocab = jnp.arange(logits.shape[-1])
    return jax.nn.log_softmax(jnp.where((vocab == PAD_ID) | (vocab == START_ID), -jnp.inf,
                                        logits), axis=-1)


def _next_word_logp(logits, tokens, t, min_length: int, no_repeat_ngram: int):
    """Log-probabilities (R, V) of the word at position ``t`` after ``tokens[:, :t]``
    (``t``: one position for every row, or one per row).

    ``<pad>`` and ``<start>`` are never words; ``<end>`` is barred before
    ``min_length`` words; a word that would repeat an n-gram is barred. When
    blocking bars every word, ``<end>`` stays open, so a caption always ends.
    """
    vocab = jnp.arange(logits.shape[-1])
    t = jnp.broadcast_to(jnp.asarray(t), logits.shape[:1])[:, None]  # (R, 1)
    model_logp = word_logp(logits)
    logp = jnp.where((t <= min_length) & (vocab == END_ID), -jnp.inf, model_logp)
    if no_repeat_ngram:
        logp = jnp.where(_repeats_ngram(tokens, t, no_repeat_ngram, logits.shape[-1]),
                         -jnp.inf, logp)
        stuck = jnp.all(logp == -jnp.inf, axis=-1, keepdims=True)
        logp = jnp.where(stuck & (vocab == END_ID), model_logp, logp)
    return logp


def _repeats_ngram(tokens, t, n: int, vocab_size: int):
    """(R, V): True where word v at position ``t`` (R, 1) would repeat an n-gram of
    ``tokens[:, :t]``."""
    rows, length = tokens.shape
    starts = jnp.arange(length - n + 1)
    grams = tokens[:, starts[:, None] + jnp.arange(n)]  # (R, S, n): every n-gram position
    # The n - 1 words before t (the window held inside the row, as a dynamic slice would).
    first = jnp.clip(t - n + 1, 0, length - (n - 1))
    suffix = jnp.take_along_axis(tokens, first + jnp.arange(n - 1), axis=1)
    # An earlier n-gram lies wholly before t (s + n - 1 <= t - 1) and starts with the suffix.
    match = jnp.all(grams[:, :, :-1] == suffix[:, None, :], axis=-1) & (starts <= t - n)
    return jnp.zeros((rows, vocab_size), bool).at[
        jnp.arange(rows)[:, None], grams[:, :, -1]].max(match)


def _top_k_cut(scaled_logp, top_k):
    """Words below the ``top_k``-th most likely barred (none for 0). ``top_k`` may be traced
    (a sort, where ``lax.top_k`` would compile a program per value of k)."""
    vocab = scaled_logp.shape[-1]
    kth = jnp.take(jnp.sort(scaled_logp, axis=-1), vocab - jnp.clip(top_k, 1, vocab), axis=-1)
    return jnp.where((top_k > 0) & (scaled_logp < kth[..., None]), -jnp.inf, scaled_logp)


def _batch_and_regions(model: Captioner, variables, inputs, context, carry) -> tuple[int, int]:
    """The batch size and the number of regions a step attends over (static shapes)."""
    tokens = jnp.zeros(inputs.shape[0], jnp.int32)
    alpha = jax.eval_shape(lambda: model.apply(variables, context, carry, tokens,
                                               method=Captioner.decode_step))[2]
    return alpha.shape


@functools.partial(jax.jit, static_argnames=("model", "max_length", "no_repeat_ngram"))
def _word_by_word(model: Captioner, variables, inputs, keys, temperature, max_length: int,
                  min_length, no_repeat_ngram: int, top_k, choice_key=None):
    """Greedy (``keys`` None) or sampled decoding, one word per loop step; with
    ``choice_key``, a rollout of a variant's choices too (``rollout``)."""
    context, carry = model.apply(variables, inputs, max_length, method=Captioner.start)
    batch, regions_count = _batch_and_regions(model, variables, inputs, context, carry)
    state = dict(t=jnp.asarray(1), carry=carry, done=jnp.zeros(batch, bool),
                 tokens=jnp.full((batch, max_length), PAD_ID, jnp.int32).at[:, 0].set(START_ID),
                 scores=jnp.zeros(batch, jnp.float32),
                 alphas=jnp.zeros((batch, max_length - 1, regions_count), jnp.float32),
                 choices=jnp.zeros((batch, max_length - 1), jnp.int32))

    def cond(state):
        return (state["t"] < max_length) & ~jnp.all(state["done"])

    def body(state):
        t, done = state["t"], state["done"]
        if choice_key is None:
            carry, logits, alpha = model.apply(variables, context, state["carry"],
                                               state["tokens"][:, t - 1],
                                               method=Captioner.decode_step)
            choice, choice_logp = state["choices"][:, t - 1], 0.0
        else:
            carry, logits, alpha, choice, choice_logp = model.apply(
                variables, context, state["carry"], state["tokens"][:, t - 1],
                method=Captioner.policy_step, rngs={"sample": jax.random.fold_in(choice_key, t)})
        logp = _next_word_logp(logits, state["tokens"], t, min_length, no_repeat_ngram)
        if keys is None:
            token = jnp.argmax(logp, axis=-1)
        else:
            token = jax.vmap(lambda key, row: jax.random.categorical(
                jax.random.fold_in(key, t), _top_k_cut(row / temperature, top_k)))(keys, logp)
        token = jnp.where(done, PAD_ID, token.astype(jnp.int32))
        emitted_logp = jnp.take_along_axis(logp, token[:, None], axis=1)[:, 0]
        return dict(t=t + 1, carry=carry, done=done | (token == END_ID),
                    tokens=state["tokens"].at[:, t].set(token),
                    scores=state["scores"] + jnp.where(done, 0.0, emitted_logp + choice_logp),
                    # no word emitted, no attention recorded
                    alphas=state["alphas"].at[:, t - 1].set(jnp.where(done[:, None], 0.0, alpha)),
                    choices=state["choices"].at[:, t - 1].set(jnp.where(done, 0, choice)))

    state = jax.lax.while_loop(cond, body, state)
    return state["tokens"], state["scores"], state["alphas"], state["choices"]


def greedy(model: Captioner, variables, inputs, max_length: int, min_length: int = 0,
           no_repeat_ngram: int = 0):
    """Greedy decoding: ``(tokens (B, max_length), score (B,), alphas (B, max_length - 1, P))``.

    Tokens start with ``<start>`` and hold ``<pad>`` after ``<end>``; alphas are
    zero after ``<end>``. ``min_length`` counts words before ``<end>``.
    """
    return _word_by_word(model, variables, inputs, None, 1.0, max_length, min_length,
                         no_repeat_ngram, 0)[:3]


def sample(model: Captioner, variables, inputs, keys, max_length: int, temperature: float = 1.0,
           top_k: int = 0, min_length: int = 0, no_repeat_ngram: int = 0):
    """Sampled decoding with one PRNG key per image (``keys`` (B, 2)); returns as ``greedy``.

    The score is the model's own log-probability of the drawn words (before
    temperature and top-k).
    """
    return _word_by_word(model, variables, inputs, keys, jnp.float32(temperature), max_length,
                         min_length, no_repeat_ngram, top_k)[:3]


def rollout(model: Captioner, variables, inputs, keys, choice_key, max_length: int):
    """A rollout of the model's policy, as self-critical training samples it: ``sample`` at
    temperature 1 with no top-k and no minimum length, a variant that ``CHOOSES`` drawing
    its choices too (from ``choice_key``; every other variant ignores it). Returns
    ``(tokens, scores, alphas, choices (B, max_length - 1))``, the score the log-probability
    of the words and the choices; ``choices`` is None for a variant that makes none."""
    model_chooses = model.decoder.CHOOSES
    tokens, scores, alphas, choices = _word_by_word(
        model, variables, inputs, keys, jnp.float32(1.0), max_length, 0, 0, 0,
        choice_key if model_chooses else None)
    return tokens, scores, alphas, choices if model_chooses else None


def best_continuations(scores, logp):
    """``(source, token, score)`` (K, B) of each image's k best continuations of its beams'
    ``scores`` (K, B) by a word of ``logp`` (K, B, V), best first. They are among each
    beam's k best: two small top-k's instead of one over K * V (a tenth of the step's time
    on a CPU), equal scores in the same order (lower beam, then lower word, first)."""
    k, batch, vocab = logp.shape
    candidates = (scores[..., None] + logp).transpose(1, 0, 2)  # (B, K, V)
    per_beam = min(k, vocab)
    beam_scores, words = jax.lax.top_k(candidates, per_beam)  # (B, K, per_beam)
    best, flat = jax.lax.top_k(beam_scores.reshape(batch, k * per_beam), k)  # (B, K)
    token = jnp.take_along_axis(words.reshape(batch, k * per_beam), flat, axis=1)
    return (flat // per_beam).T, token.T.astype(jnp.int32), best.T


def continued(source, x):
    """``x`` (K, B, ...) gathered along the beams as ``source`` (K, B) continues them."""
    return jnp.take_along_axis(x, source.reshape(*source.shape, *([1] * (x.ndim - 2))), axis=0)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_length",
                                             "no_repeat_ngram"))
def beam_search(model: Captioner, variables, inputs, beam_size: int, max_length: int,
                min_length=0, length_penalty=0.0, no_repeat_ngram: int = 0):
    """Batched beam search over images and beams together, in one ``lax.while_loop``.

    Returns ``(tokens (B, max_length), score (B,), alphas (B, max_length - 1, P))`` of each
    image's best hypothesis. Ranking during the search uses the summed log-probability;
    the final choice divides it by ``length ** length_penalty`` (0: none), the length
    counting the emitted words and ``<end>``; the returned score is the summed
    log-probability itself, without the division. Finished
    beams carry forward unchanged; when no beam of an image has ended by
    ``max_length`` its best unfinished hypothesis is returned. The loop stops as soon
    as every image is settled (``_settled``): no beam still open can end better than its
    best ended one. The feature grid is shared by an image's
    beams (``vmap`` over the beam axis with the grid unbatched), never copied per beam,
    and the first step, the same for every beam, runs once per image.
    """
    context, carry = model.apply(variables, inputs, max_length, method=Captioner.start)
    k = beam_size

    def beam_step(tokens, carry):
        # tokens (K, B), carry (K, B, ...) -> logits (K, B, V), alpha (K, B, P); the
        # context (the image's regions) is shared by the beams, not copied.
        return jax.vmap(lambda t, cr: model.apply(variables, context, cr, t,
                                                  method=Captioner.decode_step))(tokens, carry)

    state = _first_beams(model, variables, context, carry, inputs.shape[0], k, max_length,
                         min_length, no_repeat_ngram)
    batch = inputs.shape[0]

    def cond(state):
        return (state["t"] < max_length) & ~jnp.all(
            _settled(state["scores"], state["lengths"], state["done"], max_length,
                     length_penalty))

    def body(state):
        t = state["t"]
        carry, logits, alpha = beam_step(state["tokens"][:, :, t - 1], state["carry"])
        vocab = logits.shape[-1]
        logp = _next_word_logp(logits.reshape(k * batch, vocab),
                               state["tokens"].reshape(k * batch, max_length), t, min_length,
                               no_repeat_ngram).reshape(k, batch, vocab)
        # A finished beam only extends with <pad> at no cost.
        pad_only = jnp.where(jnp.arange(vocab) == PAD_ID, 0.0, -jnp.inf)
        logp = jnp.where(state["done"][..., None], pad_only, logp)
        source, token, scores = best_continuations(state["scores"], logp)
        pick = functools.partial(continued, source)

        done = pick(state["done"])
        tokens = pick(state["tokens"]).at[:, :, t].set(token)
        alphas = pick(state["alphas"]).at[:, :, t - 1].set(
            jnp.where(done[..., None], 0.0, pick(alpha)))
        return dict(t=t + 1, tokens=tokens, scores=scores,
                    carry=jax.tree.map(pick, carry), done=done | (token == END_ID),
                    lengths=pick(state["lengths"]) + (~done).astype(jnp.int32), alphas=alphas)

    state = jax.lax.while_loop(cond, body, state)
    normalized = _ranked(state["scores"], state["lengths"], length_penalty)
    # Prefer ended hypotheses; an image none of whose beams ended keeps its best unfinished one.
    any_done = jnp.any(state["done"], axis=0)
    ranked = jnp.where(state["done"] | ~any_done[None, :], normalized, -jnp.inf)
    best = jnp.argmax(ranked, axis=0)  # (B,)
    take = lambda x: jnp.take_along_axis(  # noqa: E731
        x, best.reshape(1, batch, *([1] * (x.ndim - 2))), axis=0)[0]
    return take(state["tokens"]), take(state["scores"]), take(state["alphas"])


def _first_beams(model, variables, context, carry, batch: int, k: int, max_length: int,
                 min_length, no_repeat_ngram: int) -> dict:
    """The beam search's state after its first step. Every beam would read <start> from
    the same state, so the step runs once per image (a twentieth of a search's products
    saved at 21 steps) and its k best words start the beams: the lower word first among
    equal scores, as the loop ranks them, and past the vocabulary's size, hypotheses at
    -inf."""
    tokens = jnp.full((batch, max_length), PAD_ID, jnp.int32).at[:, 0].set(START_ID)
    carry, logits, alpha = model.apply(variables, context, carry, tokens[:, 0],
                                       method=Captioner.decode_step)
    vocab, regions_count = logits.shape[-1], alpha.shape[-1]
    logp = _next_word_logp(logits, tokens, 1, min_length, no_repeat_ngram)
    logp = jnp.concatenate([logp, jnp.full((batch, max(0, k - vocab)), -jnp.inf)], axis=1)
    scores, first = jax.lax.top_k(logp, k)  # (B, K)
    first = (first % vocab).T.astype(jnp.int32)
    tokens = jnp.broadcast_to(tokens, (k, batch, max_length)).at[:, :, 1].set(first)
    carry = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), carry)
    alphas = jnp.zeros((k, batch, max_length - 1, regions_count), jnp.float32)
    return dict(t=jnp.asarray(2), tokens=tokens, scores=scores.T, carry=carry,
                done=first == END_ID, lengths=jnp.ones((k, batch), jnp.int32),
                alphas=alphas.at[:, :, 0].set(alpha))


def _ranked(scores, lengths, length_penalty):
    """What an ended hypothesis is chosen by: its summed log-probability over
    ``length ** length_penalty`` (words and ``<end>``)."""
    return scores / lengths.astype(jnp.float32) ** length_penalty


def _settled(scores, lengths, done, max_length: int, length_penalty):
    """(B,): True where an image's search can only return what it would return now.

    That is when every beam has ended, or when its best ended hypothesis ranks strictly
    above the most any open beam can still reach: an open beam's summed
    log-probability only falls, and it ends at a length between ``lengths + 1`` and
    ``max_length - 1``, so its final rank is at most its score over the length that
    favours it (the longest for a penalty >= 0). With penalty 0 a caption that ends
    ahead of every open beam settles its image at once, where waiting for every beam to
    end would run the rest of the batch for beams that can no longer win.
    """
    favoured = jnp.where(length_penalty >= 0, max_length - 1, lengths + 1)
    reach = _ranked(scores, favoured, length_penalty)
    best_ended = jnp.max(jnp.where(done, _ranked(scores, lengths, length_penalty), -jnp.inf),
                         axis=0)
    best_open = jnp.max(jnp.where(done, -jnp.inf, reach), axis=0)
    return jnp.all(done, axis=0) | (best_ended > best_open)


# ------------------------------------------------------------------ for commands


# A seed is a 32-bit unsigned number (it becomes the key ``PRNGKey(seed)``).
MAX_SEED = 2 ** 32 - 1


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How captions are searched; ``temperature`` > 0 samples (with ``beam_size`` 1)."""

    beam_size: int = 1
    max_length: int = 22  # tokens, <start> and <end> included
    min_length: int = 1  # words before <end>
    length_penalty: float = 0.0
    no_repeat_ngram: int = 0  # > 0: never repeat an n-gram of this size
    temperature: float = 0.0
    top_k: int = 0  # sampling: draw from the k most likely words; 0: all
    seed: int = 0  # sampling: image i of a call uses fold_in(PRNGKey(seed), first_index + i)

    def __post_init__(self):
        for name, least in (("beam_size", 1), ("max_length", 2), ("min_length", 0),
                            ("no_repeat_ngram", 0), ("top_k", 0), ("temperature", 0),
                            ("seed", 0)):
            if not getattr(self, name) >= least:  # NaN is refused too
                raise ValueError(f"{name} must be at least {least}, got {getattr(self, name)}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}")
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED}, got {self.seed}")
        if self.temperature > 0 and self.beam_size > 1:
            raise ValueError("sampling (temperature > 0) draws one caption: "
                             "use beam_size 1 (--beam 1)")

    @property
    def program(self) -> tuple:
        """What decides the compiled program (the rest are its arguments)."""
        return (self.temperature > 0, self.beam_size, self.max_length, self.no_repeat_ngram)


@dataclasses.dataclass
class Captions:
    """Decoded captions of N images (numpy arrays)."""

    tokens: np.ndarray  # (N, max_length), <start> first, <pad> after <end>
    texts: list[str]
    scores: np.ndarray  # (N,) summed log-probability of the emitted words
    alphas: np.ndarray  # (N, max_length - 1, P): attention when emitting tokens[:, 1:]


@functools.partial(jax.jit, static_argnames=("model", "sampling", "beam_size", "max_length",
                                             "no_repeat_ngram"))
def _search(model: Captioner, variables, inputs, first_index, seed, temperature, top_k,
            min_length, length_penalty, *, sampling: bool, beam_size: int, max_length: int,
            no_repeat_ngram: int):
    """The search ``CaptionSearch`` runs: one program per static choice, the other options
    its arguments. Sampled rows draw from ``fold_in(PRNGKey(seed), first_index + row)``."""
    if sampling:
        rows = first_index + jnp.arange(inputs.shape[0], dtype=jnp.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(rows)
        return _word_by_word(model, variables, inputs, keys, temperature, max_length,
                             min_length, no_repeat_ngram, top_k)[:3]
    if beam_size == 1:
        return _word_by_word(model, variables, inputs, None, 1.0, max_length, min_length,
                             no_repeat_ngram, 0)[:3]
    return beam_search(model, variables, inputs, beam_size, max_length, min_length,
                       length_penalty, no_repeat_ngram)


def search_function(model: Captioner, options: SearchOptions):
    """The deterministic search ``options`` describe as one function ``(variables, inputs)
    -> (tokens, scores, alphas)``: what ``CaptionSearch`` runs for them, every option fixed
    (``jaxcap export`` exports it)."""
    if options.temperature > 0:
        raise ValueError("sampling draws from a random stream: only greedy and beam search "
                         "(temperature 0) are exported")

    def search(variables, inputs):
        return _search(model, variables, inputs, np.uint32(0), np.uint32(options.seed),
                       np.float32(0), np.int32(0), np.int32(options.min_length),
                       np.float32(options.length_penalty), sampling=False,
                       beam_size=options.beam_size, max_length=options.max_length,
                       no_repeat_ngram=options.no_repeat_ngram)
    return search


class CaptionSearch:
    """Captions batches of any size with one compilation per bucket size, on all local devices.

    A batch is cut into chunks of at most ``max_batch`` images and each chunk is
    padded to the smallest bucket that holds it: ``d, 2d, 4d, ...`` up to
    ``max_batch`` for ``d`` local devices. Padded rows are dropped from the
    results and never affect the real ones (every image is decoded
    independently).

    By default the programs live in ``jax.jit``'s caches. ``compile()`` compiles every
    bucket's program ahead of time into this object instead: they are used from then
    on and freed with it (once JAX's own caches are cleared, ``jax.clear_caches``).
    """

    def __init__(self, model: Captioner, variables, vocabulary: Vocabulary,
                 options: SearchOptions, max_batch: int = 64):
        self.model, self.vocabulary, self.options = model, vocabulary, options
        devices = jax.local_devices()
        count = len(devices)
        self.max_batch = -(-max_batch // count) * count
        self.buckets = sorted({min(count * 2 ** i, self.max_batch)
                               for i in range(self.max_batch.bit_length())})
        mesh = Mesh(np.asarray(devices), ("batch",))
        self._rows = NamedSharding(mesh, PartitionSpec("batch"))
        # Variables already laid out so (another search's) are taken as they are, not copied.
        self.variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
        self._compiled: dict[int, jax.stages.Compiled] = {}

    def bucket(self, count: int) -> int:
        return next(size for size in self.buckets if size >= count)

    def __call__(self, inputs: np.ndarray, first_index: int = 0) -> Captions:
        parts = [self._chunk(inputs[start:start + self.max_batch], first_index + start)
                 for start in range(0, len(inputs), self.max_batch)]
        if not parts:
            raise ValueError("no inputs to caption")
        tokens, scores, alphas = (np.concatenate(arrays) for arrays in zip(*parts))
        return Captions(tokens, [self.vocabulary.decode(row) for row in tokens], scores, alphas)

    def _arguments(self, padded, first_index: int):
        o = self.options
        return ((self.model, self.variables, padded, np.uint32(first_index), np.uint32(o.seed),
                 np.float32(o.temperature), np.int32(o.top_k), np.int32(o.min_length),
                 np.float32(o.length_penalty)),
                dict(sampling=o.temperature > 0, beam_size=o.beam_size,
                     max_length=o.max_length, no_repeat_ngram=o.no_repeat_ngram))

    def compile(self, input_shape: tuple, dtype) -> int:
        """Compiles the program of every bucket for inputs of one image's ``input_shape``;
        returns how many were compiled."""
        for size in self.buckets:
            if size not in self._compiled:
                padded = jax.ShapeDtypeStruct((size, *input_shape), dtype, sharding=self._rows)
                args, static = self._arguments(padded, 0)
                self._compiled[size] = _search.lower(*args, **static).compile()
        return len(self.buckets)

    @property
    def compiled(self) -> int:
        """How many programs this search holds (``compile``)."""
        return len(self._compiled)

    def with_options(self, options: SearchOptions) -> "CaptionSearch":
        """This search with other values of the options that are program arguments: the
        same programs, compiled or not, and the same variables."""
        if options.program != self.options.program:
            raise ValueError(f"{options} needs another program than {self.options}")
        other = copy.copy(self)
        other.options = options
        return other

    def _chunk(self, inputs: np.ndarray, first_index: int):
        count, size = len(inputs), self.bucket(len(inputs))
        # Padded with copies of the first image, not blank ones: the search stops when
        # every row has ended, and a blank image's caption may run to max_length.
        padded = np.concatenate([inputs, np.repeat(inputs[:1], size - count, axis=0)])
        padded = jax.device_put(padded, self._rows)
        args, static = self._arguments(padded, first_index)
        if size in self._compiled:
            out = self._compiled[size](*args[1:])  # the model is part of the program
        else:
            out = _search(*args, **static)
        return tuple(np.asarray(x)[:count] for x in out)
