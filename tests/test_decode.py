"""Greedy, sampling and beam search: beam 1 is greedy, a wide beam is exhaustive, batching
and bucketing are exact, n-gram blocking and top-k hold, buckets do not recompile."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import decode
from jaxcap.data.text import END_ID, START_ID
from jaxcap.data.text import Vocabulary
from jaxcap.decode import CaptionSearch, SearchOptions, beam_search, greedy, sample
from jaxcap.models.captioner import Captioner
from jaxcap.models.decoders import SoftAttentionDecoder

VOCAB = 6  # <pad> <start> <end> <unk> and two words


@pytest.fixture(scope="module")
def setup():
    model = Captioner(SoftAttentionDecoder(vocab_size=VOCAB, feature_dim=6, embed_dim=4,
                                           hidden_dim=8, attention_dim=5, dropout_rate=0.0))
    features = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 6)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(1), features, jnp.zeros((4, 3), jnp.int32))
    # Scale the output layer so that the distributions are peaked and differ per image.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 4 if "output" in jax.tree_util.keystr(p) else x, variables)
    return model, variables, features


def _log_probs(model, variables, features, sequences):
    """Exact log-probabilities of ``sequences`` (each after <start>) for one image, by
    teacher forcing all of them as one batch (padding after a sequence changes nothing
    before it: the decoder is causal)."""
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), 1 + length), np.int32)
    tokens[:, 0] = START_ID
    for row, sequence in enumerate(sequences):
        tokens[row, 1:1 + len(sequence)] = sequence
    batch = jnp.broadcast_to(features, (len(sequences), *features.shape))
    logits = model.apply(variables, batch, jnp.asarray(tokens[:, :-1]))["logits"]
    logits = logits.at[..., 0].set(-jnp.inf).at[..., START_ID].set(-jnp.inf)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return [float(sum(logp[row, t, token] for t, token in enumerate(sequence)))
            for row, sequence in enumerate(sequences)]


def _log_prob(model, variables, features, sequence):
    return _log_probs(model, variables, features, [sequence])[0]


def _with_end_bias(variables, bias):
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[..., END_ID].set(bias)
        if jax.tree_util.keystr(p).endswith("['output']['bias']") else x, variables)


def _never_end(variables):
    return _with_end_bias(variables, -1e4)


def test_beam_of_one_is_greedy(setup):
    model, variables, features = setup
    tokens, scores, alphas = greedy(model, variables, features, 7)
    beam_tokens, beam_scores, beam_alphas = beam_search(model, variables, features, 1, 7)
    np.testing.assert_array_equal(tokens, beam_tokens)
    np.testing.assert_allclose(scores, beam_scores, rtol=1e-5)
    np.testing.assert_allclose(alphas, beam_alphas, rtol=1e-5, atol=1e-6)


def test_wide_beam_finds_the_exhaustive_optimum_and_narrow_never_beats_it(setup):
    model, variables, features = setup
    max_length = 4  # <start> + up to 3 emitted tokens
    sequences = []  # every sequence the search can emit: ends with <end>, or is cut at the length
    for n in range(1, max_length):
        for body in itertools.product(range(3, VOCAB), repeat=n - 1):
            sequences.append((*body, END_ID))
    sequences += list(itertools.product(range(3, VOCAB), repeat=max_length - 1))
    for image in range(features.shape[0]):
        scored = dict(zip(sequences, _log_probs(model, variables, features[image], sequences)))
        ended = {s: v for s, v in scored.items() if s[-1] == END_ID}
        best = max(ended.values())
        _, wide_score, _ = beam_search(model, variables, features[image:image + 1],
                                       len(sequences), max_length)
        np.testing.assert_allclose(float(wide_score[0]), best, rtol=1e-5)
        for beam in (1, 2, 3):
            _, score, _ = beam_search(model, variables, features[image:image + 1], beam, max_length)
            assert float(score[0]) <= best + 1e-5


def _emitted(tokens):
    """The tokens after <start>, up to and including <end> (all of them if none)."""
    sequence = [int(t) for t in tokens[1:]]
    return tuple(sequence[:sequence.index(END_ID) + 1] if END_ID in sequence else sequence)


@pytest.mark.parametrize("beam", [1, 2, 4])
@pytest.mark.parametrize("length_penalty", [0.0, 1.5])
@pytest.mark.parametrize("ends", [True, False])
def test_every_returned_score_is_the_summed_log_probability_of_its_tokens(
        setup, beam, length_penalty, ends):
    model, variables, features = setup
    variables = _with_end_bias(variables, 1.0) if ends else _never_end(variables)
    tokens, scores, _ = beam_search(model, variables, features, beam, 6,
                                    length_penalty=length_penalty)
    for image in range(features.shape[0]):
        sequence = _emitted(np.asarray(tokens[image]))
        assert (sequence[-1] == END_ID) == ends
        np.testing.assert_allclose(float(scores[image]),
                                   _log_prob(model, variables, features[image], sequence),
                                   rtol=1e-5, atol=1e-5)


def test_length_penalty_ranks_ended_captions_by_score_over_length_to_the_power(setup):
    """With an exhaustive beam, the caption returned is argmax log p / (words + <end>)^P."""
    model, variables, features = setup
    variables = _with_end_bias(variables, -1.0)  # long and short captions both plausible
    max_length = 5
    ended = [(*body, END_ID) for n in range(max_length - 1)
             for body in itertools.product(range(3, VOCAB), repeat=n)]
    wide = len(ended) + (VOCAB - 3) ** (max_length - 1)
    scored = [dict(zip(ended, _log_probs(model, variables, features[image], ended)))
              for image in range(features.shape[0])]
    chosen = {}
    for penalty in (0.0, 1.0, 3.0):
        tokens, _, _ = beam_search(model, variables, features, wide, max_length,
                                   length_penalty=penalty)
        for image in range(features.shape[0]):
            best = max(ended, key=lambda s: scored[image][s] / len(s) ** penalty)
            assert _emitted(np.asarray(tokens[image])) == best, (penalty, image)
            chosen[penalty, image] = best
    lengths = {p: np.mean([len(chosen[p, i]) for i in range(features.shape[0])])
               for p in (0.0, 1.0, 3.0)}
    assert lengths[0.0] < lengths[3.0]  # as documented: P > 0 favours longer captions


def test_batched_equals_one_image_at_a_time(setup):
    model, variables, features = setup
    tokens, scores, alphas = beam_search(model, variables, features, 3, 7)
    for image in range(features.shape[0]):
        one_tokens, one_score, one_alphas = beam_search(model, variables,
                                                        features[image:image + 1], 3, 7)
        np.testing.assert_array_equal(tokens[image], one_tokens[0])
        np.testing.assert_allclose(scores[image], one_score[0], rtol=1e-5)
        np.testing.assert_allclose(alphas[image], one_alphas[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("length_penalty", [0.0, 1.5, -0.5])
def test_settled_images_stop_the_search_early_and_change_nothing(setup, monkeypatch,
                                                                 length_penalty):
    """Against the search that runs until every beam has ended (Python's loop under
    ``disable_jit``, counting the loop's tests): fewer steps, the same results."""
    model, variables, features = setup
    variables = _with_end_bias(variables, -0.5)  # captions end after a few words, unevenly
    settled, steps = decode._settled, []

    def run(rule):
        monkeypatch.setattr(decode, "_settled",
                            lambda *args: steps.append(rule) or rule(*args))
        with jax.disable_jit():
            return decode.beam_search(model, variables, features, 3, 12,
                                      length_penalty=length_penalty)

    early = run(settled)
    full = run(lambda scores, lengths, done, *_: jnp.all(done, axis=0))
    for a, b in zip(early, full):
        np.testing.assert_array_equal(a, b)
    early_steps = steps.count(settled)
    full_steps = len(steps) - early_steps
    # A penalty > 0 lets an open beam hope to rank higher by running long, so it seldom
    # settles early; with none or one < 0, an ended caption ahead of every open beam
    # settles its image at once (here 2 tests of the loop against 11).
    assert 0 < early_steps <= full_steps and (early_steps < full_steps or length_penalty > 0)


def test_an_image_settles_when_no_open_beam_can_end_above_its_best_ended_one():
    scores = jnp.array([[-1.0, -3.0], [-3.0, -2.0], [-4.0, -9.0]])  # (K=3, B=2)
    lengths = jnp.array([[2, 2], [4, 3], [3, 8]])
    done = jnp.array([[True, False], [False, False], [False, True]])
    # Image 0 ended at -1 (2 words) with open beams at -3 (4 words) and -4 (3 words);
    # image 1 ended at -9 (8 words) with open beams at -3 and -2 (2 and 3 words).

    def settled(penalty):
        return list(decode._settled(scores, lengths, done, 10, penalty))

    assert settled(0.0) == [True, False]
    # 1: ended -1/2 = -0.5 against an open -3 that may run to 9 words: -3/9 is above it
    # (ended at once, -3/5, it would not be).
    assert settled(1.0) == [False, False]
    # -1: ended -1 * 2 = -2 against the open -3 ending at once: 5 words, -3 * 5 = -15.
    # Image 1 ended at -9 * 8 = -72, and its open -2 can end at -2 * 4 = -8.
    assert settled(-1.0) == [True, False]
    # -1: ended at -10 * 5 = -50; an open -10 after 1 word may end at 2: -20 is above it.
    assert not decode._settled(jnp.array([[-10.0], [-10.0]]), jnp.array([[5], [1]]),
                               jnp.array([[True], [False]]), 10, -1.0)[0]
    assert list(decode._settled(scores, lengths, jnp.ones_like(done), 10, 0.0)) == [True, True]


def test_a_model_that_never_ends_still_returns_its_best_hypothesis(setup):
    model, variables, features = setup
    never_end = _never_end(variables)
    tokens, scores, _ = beam_search(model, never_end, features, 3, 6)
    assert tokens.shape == (4, 6) and (tokens[:, 0] == START_ID).all()
    assert not (tokens == END_ID).any() and (tokens[:, 1:] >= 3).all()
    assert np.isfinite(np.asarray(scores)).all()


def _ngrams(row, n):
    words = [int(t) for t in row[1:] if t > END_ID]
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_blocked_ngrams_never_repeat(setup, search):
    model, variables, features = setup
    never_end = _never_end(variables)
    def run(**kwargs):
        if search == "greedy":
            return greedy(model, never_end, features, 9, **kwargs)[0]
        return beam_search(model, never_end, features, 3, 9, **kwargs)[0]

    # Eight words from three (<unk> is one): unblocked captions repeat bigrams (the test can fail).
    assert all(len(set(_ngrams(row, 2))) < len(_ngrams(row, 2)) for row in np.asarray(run()))
    for n in (1, 2):
        for row in np.asarray(run(no_repeat_ngram=n)):
            assert len(set(_ngrams(row, n))) == len(_ngrams(row, n)), (n, row)
            if n == 1:  # all three words used: <end> is the way out, never <pad> mid-caption
                assert list(row[4:]) == [END_ID] + [0] * 4 and len(set(row[1:4])) == 3


def test_min_length_bars_an_early_end(setup):
    model, variables, features = setup
    ends_at_once = _with_end_bias(variables, 1e4)
    tokens, _, _ = greedy(model, ends_at_once, features, 7)
    assert (np.asarray(tokens)[:, 1] == END_ID).all()
    for decoded in (greedy(model, ends_at_once, features, 7, min_length=3)[0],
                    beam_search(model, ends_at_once, features, 2, 7, min_length=3)[0]):
        decoded = np.asarray(decoded)
        assert (decoded[:, 1:4] > END_ID).all() and (decoded[:, 4] == END_ID).all()


def _keys(count, seed=0):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.arange(count))


def test_sampling_cold_or_top1_is_greedy_and_hot_varies(setup):
    model, variables, features = setup
    tokens, scores, _ = greedy(model, variables, features, 7)
    for kwargs in (dict(temperature=1e-4), dict(temperature=1.0, top_k=1)):
        sampled, sampled_scores, _ = sample(model, variables, features, _keys(4), 7, **kwargs)
        np.testing.assert_array_equal(sampled, tokens)
        np.testing.assert_allclose(sampled_scores, scores, rtol=1e-5)
    draws = {tuple(np.asarray(sample(model, variables, features, _keys(4, seed), 7,
                                     temperature=3.0)[0]).ravel()) for seed in range(4)}
    assert len(draws) > 1


def test_top_k_draws_only_among_the_k_most_likely_words(setup):
    model, variables, features = setup
    for seed in range(3):
        tokens, _, _ = sample(model, variables, features, _keys(4, seed), 7, temperature=5.0,
                              top_k=2)
        tokens = np.asarray(tokens)
        logits = model.apply(variables, features, jnp.asarray(tokens[:, :-1]))["logits"]
        logits = np.asarray(logits.at[..., 0].set(-jnp.inf).at[..., START_ID].set(-jnp.inf))
        for image, row in enumerate(tokens):
            for t in range(1, len(row)):
                if row[t] == 0:
                    break
                assert row[t] in np.argsort(logits[image, t - 1])[-2:]


def test_an_images_sample_does_not_depend_on_its_batch(setup):
    model, variables, features = setup
    keys = _keys(4, seed=5)
    tokens, _, _ = sample(model, variables, features, keys, 7, temperature=2.0)
    for image in range(4):
        alone, _, _ = sample(model, variables, features[image:image + 1], keys[image:image + 1], 7,
                             temperature=2.0)
        np.testing.assert_array_equal(alone[0], tokens[image])


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", "red", "circle"])


def test_caption_search_buckets_change_nothing_and_do_not_recompile(setup, vocabulary):
    model, variables, features = setup
    images = jnp.asarray(np.random.default_rng(3).normal(size=(11, 2, 2, 6)), jnp.float32)
    search = CaptionSearch(model, variables, vocabulary, SearchOptions(beam_size=3, max_length=7),
                           max_batch=8)
    assert search.buckets == [4, 8]  # 4 simulated devices
    out = search(np.asarray(images))  # a chunk of 8, then 3 padded to 4
    assert len(out.texts) == 11 and out.tokens.shape == (11, 7) and out.alphas.shape == (11, 6, 4)
    exact, exact_scores, exact_alphas = beam_search(model, variables, images, 3, 7, min_length=1)
    np.testing.assert_array_equal(out.tokens, exact)
    np.testing.assert_allclose(out.scores, exact_scores, rtol=1e-5)
    np.testing.assert_allclose(out.alphas, exact_alphas, rtol=1e-4, atol=1e-6)
    assert out.texts[0] == vocabulary.decode(out.tokens[0])
    compiled = beam_search._cache_size()
    for count in (1, 2, 5, 6, 7):  # buckets 4 and 8 again
        assert len(search(np.asarray(images[:count])).texts) == count
    assert beam_search._cache_size() == compiled


def test_caption_search_sampling_is_reproducible_across_chunks(setup, vocabulary):
    model, variables, features = setup
    options = SearchOptions(max_length=7, temperature=2.0, seed=9)
    whole = CaptionSearch(model, variables, vocabulary, options, max_batch=8)(np.asarray(features))
    first = CaptionSearch(model, variables, vocabulary, options, max_batch=4)
    part = first(np.asarray(features[2:]), first_index=2)
    np.testing.assert_array_equal(whole.tokens[2:], part.tokens)


def test_search_options_refuse_sampling_with_beams():
    with pytest.raises(ValueError, match="beam_size 1"):
        SearchOptions(beam_size=3, temperature=1.0)


@pytest.mark.parametrize("option, message", [
    (dict(beam_size=0), "beam_size must be at least 1, got 0"),
    (dict(max_length=1), "max_length must be at least 2, got 1"),
    (dict(min_length=-1), "min_length must be at least 0, got -1"),
    (dict(no_repeat_ngram=-1), "no_repeat_ngram must be at least 0, got -1"),  # it crashed
    (dict(top_k=-2), "top_k must be at least 0, got -2"),
    (dict(temperature=-1.0), "temperature must be at least 0, got -1.0"),
    (dict(temperature=float("nan")), "temperature must be at least 0, got nan"),
    (dict(length_penalty=float("inf")), "length_penalty must be a finite number, got inf"),
])
def test_search_options_out_of_range_name_the_option(option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SearchOptions(**option)
