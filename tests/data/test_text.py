"""Normalisation, the vocabulary, encoding and truncation."""

import numpy as np
import pytest

from jaxcap.data.text import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, normalize


def test_normalize_lowercases_strips_punctuation_and_collapses_spaces():
    assert normalize("  A dog,  running!  ") == "a dog running"
    assert normalize("A man's T-shirt.") == "a mans t shirt"
    assert normalize("Café  au_lait") == "café au lait"


def test_vocabulary_keeps_words_at_min_count_with_special_tokens_first():
    captions = ["a dog runs", "a dog sits", "a cat sits", "a dog", "the end"]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.tokens == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "sits"]
    assert (vocab.id("<pad>"), vocab.id("<start>"), vocab.id("<end>"), vocab.id("<unk>")) == (0, 1, 2, 3)
    assert vocab.id("cat") == UNK_ID


def test_encode_decode_round_trip_and_padding():
    vocab = Vocabulary.build(["a red circle", "a blue square"], min_count=1)
    ids = vocab.encode("A red square!", max_length=10)
    assert ids[0] == START_ID and ids[-1] == END_ID and len(ids) == 5
    assert vocab.decode(ids) == "a red square"
    padded = vocab.encode_padded("a red square", 8)
    assert padded.shape == (8,) and (padded[5:] == PAD_ID).all()
    assert vocab.decode(padded) == "a red square"


def test_truncation_keeps_the_first_words_and_still_ends():
    vocab = Vocabulary.build(["one two three four five six"], min_count=1)
    ids = vocab.encode("one two three four five six", max_length=5)
    assert len(ids) == 5 and ids[-1] == END_ID
    assert vocab.decode(ids) == "one two three"
    with pytest.raises(ValueError):
        vocab.encode("one", max_length=2)


def test_vocabulary_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["a b c", "a b", "a"], min_count=1)
    vocab.save(tmp_path / "vocabulary.json")
    loaded = Vocabulary.load(tmp_path / "vocabulary.json")
    assert loaded.tokens == vocab.tokens and loaded.counts == vocab.counts
    np.testing.assert_array_equal(loaded.encode("a b c", 6), vocab.encode("a b c", 6))
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="broken.json: not a jaxcap vocabulary"):
        Vocabulary.load(tmp_path / "broken.json")
