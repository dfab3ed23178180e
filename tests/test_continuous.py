"""Continuous batching gives every image the caption CaptionSearch gives it: the same tokens,
and scores and attention to float32's rounding, whatever the slot count, the chunk of steps
or the order of the images; for every decoder variant, beam, greedy and sampled search."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import configs
from jaxcap.continuous import ContinuousSearch
from jaxcap.data.text import END_ID, Vocabulary
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.models.captioner import Captioner
from jaxcap.models.decoders import VARIANTS, make_decoder
from jaxcap.runs import load_run

VOCAB, FEATURES, GRID, IMAGES = 30, 12, 3, 40
BEAM = SearchOptions(beam_size=3, max_length=10, length_penalty=0.5, no_repeat_ngram=2)


def _random_model(variant: str):
    """A random decoder on feature grids whose ``<end>`` depends strongly on its state
    (its column of the readout scaled, its bias lowered), so that captions end at varied
    lengths."""
    config = configs.load("tiny").decoder
    config.update(variant=variant, embed_dim=6, hidden_dim=16, attention_dim=8, dropout=0.0)
    config.transformer.update(width=16, heads=2, mlp_dim=24, dropout_rate=0.0)
    model = Captioner(make_decoder(config, VOCAB, FEATURES))
    variables = jax.tree.map(np.array, model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, GRID, GRID, FEATURES)), jnp.zeros((1, 5), jnp.int32)))
    output = variables["params"]["decoder"]["output"]
    output["kernel"][:, END_ID] *= 6
    output["bias"][END_ID] -= 1
    return model, variables


def _features():
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.2, 5, (IMAGES, 1, 1, 1))
    return (rng.normal(size=(IMAGES, GRID, GRID, FEATURES)) * scale).astype(np.float32)


def _vocabulary():
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(VOCAB - 4))])


def _same(found, expected, rows=slice(None)):
    np.testing.assert_array_equal(found.tokens, expected.tokens[rows])
    np.testing.assert_allclose(found.scores, expected.scores[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(found.alphas, expected.alphas[rows], rtol=0, atol=1e-5)
    assert found.texts == list(np.asarray(expected.texts, dtype=object)[rows])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_image_gets_the_batch_searchs_caption(variant):
    model, variables = _random_model(variant)
    features, vocabulary = _features(), _vocabulary()
    expected = CaptionSearch(model, variables, vocabulary, BEAM, max_batch=64)(features)
    assert len({int(np.sum(row > END_ID)) for row in expected.tokens}) >= 2  # lengths vary
    # 5 slots: not a multiple of the 4 devices (the other tests' are: split over them)
    search = ContinuousSearch(model, variables, vocabulary, BEAM, slots=5, chunk=3)
    _same(search(features), expected)
    order = np.random.default_rng(1).permutation(IMAGES)
    _same(search(features[order]), expected, order)


@pytest.mark.parametrize("options", [SearchOptions(max_length=10, min_length=2),
                                     SearchOptions(max_length=10, temperature=0.8, top_k=5,
                                                   seed=7)], ids=["greedy", "sampling"])
def test_greedy_and_sampled_captions_are_the_batch_searchs(options):
    """Sampling: every image draws from its own stream (its index in the call), so its
    caption does not depend on the slots it shares."""
    model, variables = _random_model("soft")
    features, vocabulary = _features(), _vocabulary()
    expected = CaptionSearch(model, variables, vocabulary, options, max_batch=64)(features)
    search = ContinuousSearch(model, variables, vocabulary, options, slots=8, chunk=1)
    _same(search(features), expected)
    offset = CaptionSearch(model, variables, vocabulary, options, max_batch=64)(features, 100)
    _same(search(features, 100), offset)


def test_a_trained_run_captions_its_images_alike(trained_run):
    """The tiny trained run, end to end: the encoder runs on the images as they enter."""
    run = load_run(trained_run)
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (13, 32, 32, 3), dtype=np.uint8)
    options = SearchOptions(beam_size=2, max_length=12)
    expected = CaptionSearch(run.image_model, run.image_variables, run.vocabulary, options,
                             max_batch=16)(pixels)
    found = ContinuousSearch(run.image_model, run.image_variables, run.vocabulary, options,
                             slots=4, chunk=3)
    _same(found(pixels), expected)
    streamed = list(found.stream(((f"image{i}", p) for i, p in enumerate(pixels))))
    assert [key for key, *_ in streamed] == [f"image{i}" for i in range(13)]
    np.testing.assert_array_equal(np.stack([tokens for _, tokens, _, _ in streamed]),
                                  expected.tokens)
