"""GloVe: the packaged vectors, text files, and the embedding matrix rule."""

import numpy as np
import pytest

from jaxcap.data import glove
from jaxcap.data.text import Vocabulary


def test_default_is_the_real_glove_6b_50d():
    vectors = glove.load_default()
    assert len(vectors.words) == 400_000 and vectors.dim == 50
    index = vectors.index()
    assert vectors.words[0] == "the"
    # Real vectors: related words are closer than unrelated ones.
    def cosine(a, b):
        x, y = vectors.vectors[index[a]], vectors.vectors[index[b]]
        return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
    assert cosine("dog", "cat") > cosine("dog", "economics") + 0.3


def test_text_file_and_its_errors(tmp_path):
    path = tmp_path / "glove.test.3d.txt"
    path.write_text("dog 0.1 0.2 0.3\ncat 0.1 0.2 0.25\n")
    vectors = glove.read_text(path)
    assert vectors.words == ["dog", "cat"] and vectors.vectors.shape == (2, 3)
    assert glove.dimension(str(path)) == 3 and glove.dimension("default") == 50
    with pytest.raises(glove.GloveError, match=r"glove.absent.txt: no such file"):
        glove.dimension(str(tmp_path / "glove.absent.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(glove.GloveError, match=r"empty.txt: no vectors"):
        glove.dimension(str(tmp_path / "empty.txt"))
    path.write_text("dog 0.1 0.2 0.3\ncat 0.1 0.2\n")
    with pytest.raises(glove.GloveError, match=r"glove.test.3d.txt:2: 2 numbers, expected 3"):
        glove.read_text(path)
    path.write_bytes(b"dog 0.1 0.2 0.3\n\xff\xfe 1 2 3\n")
    with pytest.raises(glove.GloveError, match=r":2: not UTF-8"):
        glove.read_text(path)
    path.write_text("dog 0.1 x 0.3\n")
    with pytest.raises(glove.GloveError, match=r":1: expected a word and numbers"):
        glove.read_text(path)


def test_embedding_matrix_rule_and_coverage():
    vectors = glove.Glove(["dog", "cat", "a"], np.asarray(
        [[1, 2], [3, 4], [5, 6]], np.float32), "test")
    vocab = Vocabulary.build(["a dog", "a dog", "a cat", "a zebra", "a zebra", "a zebra", "a qux"],
                             min_count=1)
    matrix, coverage = glove.embedding_matrix(vocab, vectors, seed=0)
    assert matrix.shape == (len(vocab), 2) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[vocab.id("dog")], [1, 2])
    np.testing.assert_array_equal(matrix[vocab.id("a")], [5, 6])
    assert (matrix[0] == 0).all()  # <pad>
    assert coverage.found == 3 and coverage.total == 5
    assert coverage.missing_by_count == [("zebra", 3), ("qux", 1)]
    assert "3/5" in coverage.report() and "zebra (3)" in coverage.report()
    again, _ = glove.embedding_matrix(vocab, vectors, seed=0)
    np.testing.assert_array_equal(matrix, again)
    assert not np.allclose(matrix[vocab.id("zebra")], matrix[vocab.id("qux")])
