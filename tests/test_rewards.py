"""SCST's rewards on token ids equal pycocoevalcap's CIDEr-D and BLEU-4, caption by caption."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from jaxcap import rewards, scst
from jaxcap.data.text import END_ID, PAD_ID, START_ID, Vocabulary


def _corpus(rng, images=40, vocab=10):
    """Captions over a small vocabulary, so n-grams repeat within and across captions;
    1 to 5 references per image; hypotheses from empty to longer than any reference,
    one equal to a reference and one a single word."""
    def caption(low, high):
        return [int(w) for w in rng.integers(4, 4 + vocab, rng.integers(low, high + 1))]

    references = [[caption(1, 12) for _ in range(rng.integers(1, 6))] for _ in range(images)]
    hypotheses = [caption(0, 15) for _ in range(images)]
    hypotheses[3], hypotheses[4], hypotheses[5] = list(references[3][0]), [], [7]
    hypotheses[6] = [5, 5, 5, 5, 5, 5]
    return references, hypotheses


def _text(words):
    return " ".join(f"w{w}" for w in words)


def _as_arrays(hypotheses, length=16):
    words = np.full((len(hypotheses), length), -1, np.int32)
    for i, h in enumerate(hypotheses):
        words[i, :len(h)] = h
    return words, np.asarray([len(h) for h in hypotheses], np.int32)


@pytest.fixture(scope="module")
def corpus():
    references, hypotheses = _corpus(np.random.default_rng(0))
    gts = {i: [_text(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [_text(h)] for i, h in enumerate(hypotheses)}
    return references, hypotheses, gts, res


def test_cider_d_equals_pycocoevalcap_caption_by_caption(corpus):
    references, hypotheses, gts, res = corpus
    _, expected = Cider().compute_score(gts, res)  # df from these references, as ours
    table = rewards.References.build(references)
    scores = jax.jit(rewards.cider_d)(*_as_arrays(hypotheses), table, jnp.arange(len(gts)))
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores[3] > 1 and scores[4] == 0  # a reference itself scores high, nothing scores 0


def test_bleu4_equals_pycocoevalcap_caption_by_caption(corpus):
    references, hypotheses, gts, res = corpus
    _, per_order = Bleu(4).compute_score(gts, res, verbose=0)
    table = rewards.References.build(references)
    scores = jax.jit(rewards.bleu4)(*_as_arrays(hypotheses), table, jnp.arange(len(gts)))
    np.testing.assert_allclose(scores, per_order[3], rtol=1e-5, atol=1e-12)
    assert scores[3] == pytest.approx(1.0)


def test_scores_do_not_depend_on_the_order_or_company_of_the_captions(corpus):
    references, hypotheses, _, _ = corpus
    table = rewards.References.build(references)
    words, lengths = _as_arrays(hypotheses)
    order = np.random.default_rng(1).permutation(len(hypotheses))[:7]
    cider_d = jax.jit(rewards.cider_d)
    together = cider_d(words, lengths, table, jnp.arange(len(hypotheses)))
    apart = cider_d(words[order], lengths[order], table, jnp.asarray(order))
    np.testing.assert_allclose(apart, np.asarray(together)[order], rtol=1e-6)


def test_document_frequencies_are_looked_up_exactly():
    references = [[[4, 5, 6]], [[4, 5]], [[6, 4, 5, 6]]]
    table = rewards.References.build(references)
    grams = jnp.asarray([[4, -1, -1, -1], [4, 5, -1, -1], [5, 6, -1, -1], [4, 5, 6, -1],
                         [6, 4, 5, 6], [7, -1, -1, -1], [6, 6, -1, -1], [6, 4, 5, 7]])
    np.testing.assert_array_equal(rewards.document_frequency(table, grams),
                                  [3, 3, 2, 2, 1, 0, 0, 0])


def test_caption_words_end_with_the_end_token():
    tokens = np.asarray([[START_ID, 7, 8, END_ID, PAD_ID], [START_ID, END_ID, PAD_ID, PAD_ID, 0],
                         [START_ID, 5, 6, 7, 8]], np.int32)
    words, lengths = rewards.caption_words(tokens)
    np.testing.assert_array_equal(lengths, [3, 1, 4])  # the last was cut: no <end>
    np.testing.assert_array_equal(words, [[7, 8, END_ID, -1], [END_ID, -1, -1, -1], [5, 6, 7, 8]])


def test_the_scst_reward_counts_the_end_token_as_self_critical_training_does():
    """The SCST reward of decoded rows equals pycocoevalcap's CIDEr-D of the same captions
    with ``<end>`` appended to the finished ones and to every reference (as Rennie et al.
    and self-critical.pytorch's ``array_to_str`` write them), and a caption cut at the
    maximum length scores below the same words finished."""
    captions = [["a red circle", "a red circle above a blue square", "one red circle"],
                ["a blue square left of a green star", "a green star and a blue square"],
                ["a yellow diamond", "the yellow diamond"],
                ["a green circle right of a red star", "a red star and a green circle"]]
    vocabulary = Vocabulary.build([c for image in captions for c in image], min_count=1)
    table = scst.training_references(captions, vocabulary)

    def row(text, ended=True, length=9):
        ids = [START_ID, *(vocabulary.id(w) for w in text.split()), *([END_ID] if ended else [])]
        return ids + [PAD_ID] * (length - len(ids))

    samples = [("a red circle", True), ("a red circle above a", True),
               ("a blue square left of a green", False), ("a yellow diamond", True),
               ("a red star and a green circle", True), ("a red star and a green", False)]
    images = [0, 0, 1, 2, 3, 3]
    tokens = np.asarray([row(text, ended) for text, ended in samples], np.int32)
    scores = jax.jit(lambda t: rewards.cider_d(*rewards.caption_words(t), table,
                                               jnp.asarray(images)))(tokens)

    gts = {i: [c + " <end>" for c in image] for i, image in enumerate(captions)}
    for (text, ended), image, score in zip(samples, images, np.asarray(scores)):
        # pycocoevalcap takes its document frequencies from the references of the images
        # it scores: every image is scored, with this caption for its own.
        res = {i: [text + (" <end>" if ended else "") if i == image else gts[i][0]]
               for i in gts}
        _, expected = Cider().compute_score(gts, res)
        assert score == pytest.approx(expected[image], rel=1e-5, abs=1e-6), text
    # Cut at the maximum length, a caption misses the references' closing n-grams (without
    # <end> counted, the same words scored the same, finished or not).
    finished, cut = jax.jit(lambda t: rewards.cider_d(*rewards.caption_words(t), table,
                                                      jnp.asarray([3, 3])))(np.asarray(
        [row("a red star and a green circle"), row("a red star and a green circle", False)],
        np.int32))
    assert cut < finished, (cut, finished)


def length_reward(words, lengths, references, image):
    """A user's reward for the test below: longer is better."""
    return lengths.astype(jnp.float32)


def test_a_reward_combines_weighted_terms_and_user_functions(corpus):
    references, hypotheses, _, _ = corpus
    table = rewards.References.build(references)
    args = (*_as_arrays(hypotheses), table, jnp.arange(len(hypotheses)))
    combined = rewards.make_reward({"cider_d": 1.0, "bleu4": 0.5,
                                    "tests.test_rewards:length_reward": 0.1})(*args)
    np.testing.assert_allclose(combined, rewards.cider_d(*args) + 0.5 * rewards.bleu4(*args)
                               + 0.1 * args[1], rtol=1e-6)
    with pytest.raises(ValueError, match="neither built-in"):
        rewards.make_reward({"cider": 1.0})
    with pytest.raises(ValueError, match="cannot be loaded"):
        rewards.make_reward({"tests.test_rewards:no_such_reward": 1.0})
    with pytest.raises(ValueError, match="nonzero weight"):
        rewards.make_reward({"cider_d": 0.0})
    with pytest.raises(ValueError, match="at least one reference"):
        rewards.References.build([[[4, 5]], []])
