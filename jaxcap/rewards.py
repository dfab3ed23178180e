"""Sentence rewards for self-critical training, computed on token ids inside ``jax.jit``.

* ``cider_d``: CIDEr-D exactly as pycocoevalcap's ``Cider`` scores one caption
  (tf-idf vectors of its 1- to 4-grams, counts clipped by the reference's,
  cosine against each reference, a Gaussian penalty on the length difference
  with sigma 6 (pycocoevalcap measures length in bigrams), mean over n and
  references, times 10), with document frequencies from a fixed set of
  references (the training split's in SCST) rather than from the scored set.
* ``bleu4``: pycocoevalcap's per-caption BLEU-4 (clipped n-gram precisions with
  its smoothing constants, brevity penalty against the closest reference length).

Both compare n-grams token by token (no hashing, so no collisions): a caption of
L words against references of L' words is a few (L, L') comparisons per n. The
document frequencies live in a sorted table of every n-gram of the references,
looked up by binary search. ``References.build`` makes the tables once, in numpy.

SCST scores captions with their ``<end>`` counted as a word, in the samples
(``caption_words``) and in the references (``scst.training_references``), as
Rennie et al. (2017) and self-critical.pytorch do: a caption cut at the maximum
length misses the references' closing n-grams.

A custom reward is any JAX function ``(words, lengths, references, image) -> (N,)``
with the arguments of ``cider_d`` (``<end>`` among the words, as above);
``make_reward`` combines them with weights.
"""

from __future__ import annotations

import collections
import importlib
import math
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxcap.data.text import END_ID, PAD_ID

MAX_N = 4
SIGMA = 6.0  # pycocoevalcap's CIDEr-D length penalty
_NO_WORD = -1  # past the end of a caption: equal to no word of another


@flax.struct.dataclass
class References:
    """The references of a split and their n-gram statistics, as arrays.

    ``words`` (N, R, L): each image's reference captions as word ids, -1 past
    their ``lengths`` (N, R); ``count`` (N,) references per image (rows past it
    have length 0). ``ngrams`` (T, 4): every distinct 1- to 4-gram of all
    references, -1-padded to 4 and sorted; ``df`` (T,): in how many images'
    references each occurs. ``norms`` (N, R, 4): each reference's tf-idf norm
    per n; ``log_images``: log of the number of images (CIDEr's ``ref_len``).
    """

    words: jnp.ndarray
    lengths: jnp.ndarray
    count: jnp.ndarray
    ngrams: jnp.ndarray
    df: jnp.ndarray
    norms: jnp.ndarray
    log_images: jnp.ndarray

    @classmethod
    def build(cls, references: list[list[list[int]]]) -> "References":
        """From each image's references as lists of word ids."""
        if not references or not all(references):
            raise ValueError("every image needs at least one reference")
        df = collections.Counter()
        counted = []
        for refs in references:
            per_ref = [_ngram_counts(ref) for ref in refs]
            counted.append(per_ref)
            df.update(set().union(*per_ref))
        log_images = math.log(len(references))
        refs_max = max(len(refs) for refs in references)
        length_max = max(1, max(len(ref) for refs in references for ref in refs))
        words = np.full((len(references), refs_max, length_max), _NO_WORD, np.int32)
        lengths = np.zeros((len(references), refs_max), np.int32)
        norms = np.zeros((len(references), refs_max, MAX_N), np.float64)
        for i, (refs, per_ref) in enumerate(zip(references, counted)):
            for r, (ref, counts) in enumerate(zip(refs, per_ref)):
                words[i, r, :len(ref)] = ref
                lengths[i, r] = len(ref)
                for gram, tf in counts.items():
                    norms[i, r, len(gram) - 1] += (tf * (log_images - math.log(df[gram]))) ** 2
        grams = sorted(gram + (_NO_WORD,) * (MAX_N - len(gram)) for gram in df)
        table = np.asarray(grams, np.int32).reshape(-1, MAX_N)
        arrays = dict(words=words, lengths=lengths,
                      count=np.asarray([len(refs) for refs in references], np.int32),
                      ngrams=table,
                      df=np.asarray([df[tuple(g for g in row if g != _NO_WORD)] for row in grams],
                                    np.float32),
                      norms=np.sqrt(norms).astype(np.float32),
                      log_images=np.float32(log_images))
        return cls(**{name: jnp.asarray(value) for name, value in arrays.items()})


def _ngram_counts(words: list[int]) -> collections.Counter:
    return collections.Counter(tuple(words[i:i + n]) for n in range(1, MAX_N + 1)
                               for i in range(len(words) - n + 1))


def caption_words(tokens) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Decoded rows ``<start> w1 .. wk <end> <pad>..`` (N, T) -> ``(words (N, T-1), lengths
    (N,))``: ``w1 .. wk <end>``, -1 after. ``<end>`` is a word of the caption, as Rennie et
    al. (2017) score it and self-critical.pytorch writes it (``array_to_str``), so that a
    caption cut at the maximum length (no ``<end>``) matches none of the references'
    closing n-grams and scores below the finished one."""
    words = tokens[:, 1:]
    stop = (words == END_ID) | (words == PAD_ID)
    after_stop = jnp.cumsum(stop, axis=1) - stop > 0
    outside = after_stop | (words == PAD_ID)
    return jnp.where(outside, _NO_WORD, words), jnp.sum(~outside, axis=1).astype(jnp.int32)


def _ngrams(words, n: int):
    """(..., L) -> (..., L, 4): the n-gram starting at each position, -1-padded to 4."""
    padded = jnp.concatenate([words, jnp.full((*words.shape[:-1], n - 1), _NO_WORD,
                                              words.dtype)], axis=-1)
    length = words.shape[-1]
    grams = jnp.stack([padded[..., k:k + length] for k in range(n)], axis=-1)
    return jnp.concatenate([grams, jnp.full((*grams.shape[:-1], MAX_N - n), _NO_WORD,
                                            words.dtype)], axis=-1)


def _lexicographic_less(a, b):
    differ = a != b
    first = jnp.argmax(differ, axis=-1)[..., None]
    return jnp.any(differ, axis=-1) & (jnp.take_along_axis(a, first, -1)[..., 0] <
                                       jnp.take_along_axis(b, first, -1)[..., 0])


def document_frequency(references: References, grams):
    """df of each n-gram (..., 4) in ``references`` (0 where it never occurs): a binary
    search of the sorted table, all queries at once."""
    table = references.ngrams
    size = table.shape[0]
    queries = grams.reshape(-1, MAX_N)
    low = jnp.zeros(len(queries), jnp.int32)
    high = jnp.full(len(queries), size, jnp.int32)

    def halve(_, bounds):
        low, high = bounds
        middle = (low + high) // 2
        below = _lexicographic_less(table[jnp.minimum(middle, size - 1)], queries) & (low < high)
        return jnp.where(below, middle + 1, low), jnp.where(below | (low >= high), high, middle)

    low, _ = jax.lax.fori_loop(0, max(1, size).bit_length(), halve, (low, high))
    at = jnp.minimum(low, size - 1)
    found = (low < size) & jnp.all(table[at] == queries, axis=-1)
    return jnp.where(found, references.df[at], 0.0).reshape(grams.shape[:-1])


def _matches(words, lengths, other, other_lengths, n: int):
    """(N, L, *other.shape[1:-1], L'): the n-gram at each position of ``words`` equals the one at
    each position of ``other`` (both whole, inside their captions)."""
    mine = _ngrams(words, n)  # (N, L, 4)
    theirs = _ngrams(other, n)  # (N, ..., L', 4)
    inside = jnp.arange(words.shape[-1]) + n <= lengths[:, None]  # (N, L)
    inside_other = jnp.arange(other.shape[-1]) + n <= other_lengths[..., None]
    extra = theirs.ndim - 2 - 1  # axes between N and L' in other
    mine = mine.reshape(mine.shape[0], mine.shape[1], *([1] * extra), 1, MAX_N)
    theirs = theirs[:, None]
    equal = jnp.all(mine == theirs, axis=-1)
    return equal & inside.reshape(*inside.shape, *([1] * (extra + 1))) & inside_other[:, None], \
        inside


def _own_counts(words, lengths, n: int):
    """Per position of each caption: ``(first, tf)``: whether the n-gram there (inside the
    caption) occurs for the first time, and how often it occurs in the caption."""
    same, inside = _matches(words, lengths, words, lengths, n)  # (N, L, L)
    earlier = jnp.tril(jnp.ones(same.shape[-2:], bool), k=-1)
    first = inside & ~jnp.any(same & earlier, axis=-1)
    return first, jnp.sum(same, axis=-1).astype(jnp.float32)


def cider_d(words, lengths, references: References, image):
    """CIDEr-D (N,) of captions ``words`` (N, L) of ``lengths`` (N,) words, -1 past them,
    against the references of images ``image`` (N,)."""
    ref_words, ref_lengths = references.words[image], references.lengths[image]  # (N, R, L')
    ref_norms = references.norms[image]  # (N, R, 4)
    ref_used = jnp.arange(ref_words.shape[1]) < references.count[image][:, None]  # (N, R)
    values = []
    for n in range(1, MAX_N + 1):
        first, tf = _own_counts(words, lengths, n)
        idf = references.log_images - jnp.log(jnp.maximum(
            1.0, document_frequency(references, _ngrams(words, n))))  # (N, L)
        weight = jnp.where(first, idf, 0.0)
        norm = jnp.sqrt(jnp.sum((tf * weight) ** 2, axis=-1))  # (N,)
        in_ref, _ = _matches(words, lengths, ref_words, ref_lengths, n)  # (N, L, R, L')
        ref_tf = jnp.sum(in_ref, axis=-1).astype(jnp.float32)  # (N, L, R)
        dot = jnp.sum((jnp.minimum(tf[..., None], ref_tf) * ref_tf * weight[..., None] ** 2),
                      axis=1)  # (N, R)
        product = norm[:, None] * ref_norms[..., n - 1]
        values.append(dot / jnp.where(product != 0, product, 1.0))
    # pycocoevalcap's length is the number of bigrams.
    delta = (jnp.maximum(lengths - 1, 0)[:, None] - jnp.maximum(ref_lengths - 1, 0)).astype(
        jnp.float32)
    penalty = jnp.exp(-delta ** 2 / (2 * SIGMA ** 2))
    per_ref = jnp.mean(jnp.stack(values), axis=0) * penalty * ref_used
    return 10.0 * jnp.sum(per_ref, axis=-1) / references.count[image]


def bleu4(words, lengths, references: References, image):
    """pycocoevalcap's BLEU-4 (N,) of each caption alone, arguments as ``cider_d``."""
    ref_words, ref_lengths = references.words[image], references.lengths[image]
    ref_used = jnp.arange(ref_words.shape[1]) < references.count[image][:, None]
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's
    log_precision = 0.0
    for n in range(1, MAX_N + 1):
        first, tf = _own_counts(words, lengths, n)
        in_ref, _ = _matches(words, lengths, ref_words, ref_lengths, n)
        most = jnp.max(jnp.where(ref_used[:, None], jnp.sum(in_ref, axis=-1), 0), axis=-1)
        correct = jnp.sum(jnp.where(first, jnp.minimum(tf, most), 0.0), axis=-1)
        guess = jnp.maximum(lengths - n + 1, 0).astype(jnp.float32)
        log_precision = log_precision + jnp.log((correct + tiny) / (guess + small))
    # The closest reference length, the shorter on a tie.
    gap = jnp.where(ref_used, jnp.abs(ref_lengths - lengths[:, None]), jnp.iinfo(jnp.int32).max)
    key = gap.astype(jnp.float32) * 1e4 + ref_lengths
    closest = jnp.take_along_axis(ref_lengths, jnp.argmin(key, axis=-1)[:, None], 1)[:, 0]
    ratio = (lengths + tiny) / (closest + small)
    brevity = jnp.where(ratio < 1, 1 - 1 / ratio, 0.0)
    return jnp.exp(log_precision / MAX_N + brevity)


BUILT_IN: dict[str, Callable] = {"cider_d": cider_d, "bleu4": bleu4}


def load_function(name: str) -> Callable:
    """A built-in reward by name, or ``package.module:function``."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module, colon, function = name.partition(":")
    if not colon:
        raise ValueError(f"reward {name!r}: neither built-in {sorted(BUILT_IN)} nor "
                         "'package.module:function'")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {name!r} cannot be loaded: {error}") from None


def make_reward(weights: dict[str, float]) -> Callable:
    """``sum_k weight_k * reward_k``, rewards named as ``load_function`` takes them; zero
    weights are left out."""
    terms = [(load_function(name), float(w)) for name, w in weights.items() if w]
    if not terms:
        raise ValueError("the reward has no term with a nonzero weight")

    def reward(words, lengths, references, image):
        return sum(w * fn(words, lengths, references, image) for fn, w in terms)
    return reward
