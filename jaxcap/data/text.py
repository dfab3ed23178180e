"""Caption text: normalisation, the vocabulary, and token ids.

Normalisation: lowercase; apostrophes dropped (``man's`` -> ``mans``, as
GloVe-free captioning code commonly does, so that possessives stay one word);
every other character that is not a letter or digit becomes a space; spaces
collapse.

Token ids: ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then
the words that occur at least ``min_count`` times in the training captions,
most frequent first (ties alphabetical, so the ids are deterministic).

Truncation: ``max_length`` counts every token, ``<start>`` and ``<end>``
included. A longer caption keeps its first ``max_length - 2`` words and still
ends with ``<end>``, so the model always learns to stop.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxcap.files import write_text_atomic

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_NOT_WORD = re.compile(r"[^\w]+|_+")


def normalize(caption: str) -> str:
    """``'A dog, running!'`` -> ``'a dog running'``."""
    text = caption.lower().replace("'", "").replace("\u2019", "")
    return " ".join(_NOT_WORD.sub(" ", text).split())


def words(caption: str) -> list[str]:
    return normalize(caption).split()


class Vocabulary:
    """Word <-> id mapping; saved as JSON with every checkpoint."""

    def __init__(self, tokens: list[str], counts: dict[str, int] | None = None,
                 min_count: int = 1):
        if tuple(tokens[:4]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary holds each token once")
        self.tokens = list(tokens)
        self.counts = dict(counts or {})
        self.min_count = min_count
        self._ids = {token: index for index, token in enumerate(self.tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        counts = collections.Counter(w for caption in captions for w in words(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count),
                      key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + kept, dict(counts), min_count)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)

    def encode(self, caption: str, max_length: int) -> np.ndarray:
        """Token ids ``[<start>, w1, ..., <end>]`` of length at most ``max_length``."""
        if max_length < 3:
            raise ValueError("max_length must leave room for <start>, a word and <end>")
        ids = [self.id(w) for w in words(caption)][: max_length - 2]
        return np.asarray([START_ID, *ids, END_ID], np.int32)

    def encode_padded(self, caption: str, max_length: int) -> np.ndarray:
        """``encode`` padded with ``<pad>`` to exactly ``max_length``."""
        ids = self.encode(caption, max_length)
        return np.pad(ids, (0, max_length - len(ids)), constant_values=PAD_ID)

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<end>``; ``<start>`` and ``<pad>`` are left out."""
        out = []
        for index in ids:
            index = int(index)
            if index == END_ID:
                break
            if index not in (PAD_ID, START_ID):
                out.append(self.tokens[index])
        return " ".join(out)

    def to_json(self) -> dict:
        return dict(format="jaxcap.vocabulary", version=1, min_count=self.min_count,
                    tokens=self.tokens, counts=self.counts)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(path, json.dumps(self.to_json(), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text(encoding="utf8"))
            return cls(data["tokens"], data.get("counts"), data.get("min_count", 1))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a jaxcap vocabulary file ({error})") from None
