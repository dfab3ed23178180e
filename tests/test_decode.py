"""Greedy and beam search: beam 1 is greedy, a wide beam is exhaustive, batching is exact."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap.data.text import END_ID, START_ID
from jaxcap.decode import beam_search, greedy
from jaxcap.models.captioner import Captioner
from jaxcap.models.decoder import CaptionDecoder

VOCAB = 6  # <pad> <start> <end> <unk> and two words


@pytest.fixture(scope="module")
def setup():
    model = Captioner(CaptionDecoder(vocab_size=VOCAB, feature_dim=6, embed_dim=4, hidden_dim=8,
                                     attention_dim=5, dropout_rate=0.0))
    features = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 6)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(1), features, jnp.zeros((4, 3), jnp.int32))
    # Scale the output layer so that the distributions are peaked and differ per image.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 4 if "output" in jax.tree_util.keystr(p) else x, variables)
    return model, variables, features


def _log_prob(model, variables, features, sequence):
    """Exact log-probability of ``sequence`` (after <start>) for one image, by teacher forcing."""
    tokens = jnp.asarray([[START_ID, *sequence]], jnp.int32)
    logits, _ = model.apply(variables, features[None], tokens[:, :-1])
    logits = logits.at[..., 0].set(-jnp.inf).at[..., START_ID].set(-jnp.inf)
    logp = jax.nn.log_softmax(logits[0], axis=-1)
    return float(sum(logp[t, token] for t, token in enumerate(sequence)))


def test_beam_of_one_is_greedy(setup):
    model, variables, features = setup
    tokens, alphas = greedy(model, variables, features, 7)
    beam_tokens, _, beam_alphas = beam_search(model, variables, features, 1, 7)
    np.testing.assert_array_equal(tokens, beam_tokens)
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
        scored = {s: _log_prob(model, variables, features[image], s) for s in sequences}
        ended = {s: v for s, v in scored.items() if s[-1] == END_ID}
        best = max(ended.values())
        _, wide_score, _ = beam_search(model, variables, features[image:image + 1],
                                       len(sequences), max_length)
        np.testing.assert_allclose(float(wide_score[0]), best, rtol=1e-5)
        for beam in (1, 2, 3):
            _, score, _ = beam_search(model, variables, features[image:image + 1], beam, max_length)
            assert float(score[0]) <= best + 1e-5


def test_batched_equals_one_image_at_a_time(setup):
    model, variables, features = setup
    tokens, scores, alphas = beam_search(model, variables, features, 3, 7)
    for image in range(features.shape[0]):
        one_tokens, one_score, one_alphas = beam_search(model, variables,
                                                        features[image:image + 1], 3, 7)
        np.testing.assert_array_equal(tokens[image], one_tokens[0])
        np.testing.assert_allclose(scores[image], one_score[0], rtol=1e-5)
        np.testing.assert_allclose(alphas[image], one_alphas[0], rtol=1e-4, atol=1e-6)


def test_a_model_that_never_ends_still_returns_its_best_hypothesis(setup):
    model, variables, features = setup
    never_end = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[..., END_ID].set(-1e4)
        if jax.tree_util.keystr(p).endswith("['output']['bias']") else x, variables)
    tokens, scores, _ = beam_search(model, never_end, features, 3, 6)
    assert tokens.shape == (4, 6) and (tokens[:, 0] == START_ID).all()
    assert not (tokens == END_ID).any() and (tokens[:, 1:] >= 3).all()
    assert np.isfinite(np.asarray(scores)).all()
