"""Caption metrics: the COCO ones as pycocoevalcap computes them, and grounded ones on shapes.

COCO metrics (``caption_metrics``): BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
(pycocoevalcap's ``Cider`` is CIDEr-D: clipped counts and a length penalty)
run on captions tokenised the way ``pycocoevalcap.eval.COCOEvalCap`` does,
with Stanford's PTB tokenizer. Both that tokenizer and METEOR run in Java;
without Java (or with ``tokenizer="python"``), captions are tokenised by
``ptb_tokens``, a Python rendering of that tokenizer (tested against it), and
METEOR is left out. Training's per-epoch BLEU uses the Python tokenizer, so it
never starts Java. One METEOR process (about 12 s to start) serves a Python
process.

Grounded metrics on ``shapes`` (exact, because every object's colour, shape
and box is known):

* ``content_accuracy``: the share of images whose caption names exactly the
  right colour-shape objects (as a multiset: "a red circle and a red circle"
  for two red circles);
* ``attention_correctness``: for every word that names an object of the image
  (its size, colour and shape words), the attention mass that falls inside
  that object's box, averaged over those words; ``attention_uniform`` is what
  attention spread evenly over the image would score, for scale.
"""

from __future__ import annotations

import collections
import functools
import re
import shutil
import warnings

import numpy as np

from jaxcap.data import shapes
from jaxcap.data.text import normalize

COCO_METRICS = ("bleu", "meteor", "rouge", "cider")


def java_available() -> bool:
    return shutil.which("java") is not None


# What pycocoevalcap drops after PTB tokenisation (its PUNCTUATIONS, quotes
# included: the tokenizer turns '"' into `` or ''). Brackets become -lrb- etc.,
# which pycocoevalcap keeps (its list has them upper case, the tokens are lower).
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc")
_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ve|ll|d|m))\b")
_PTB_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"
    r"|(?:\w\.){2,}"  # acronyms keep their periods: p.m., u.s.
    rf"|\b(?:{'|'.join(_ABBREVIATIONS)})\."
    r"|\d+:\d+"  # times
    r"|\w+(?:[-.&/]\w+)*|\.\.\.|--|\S")


def ptb_tokens(caption: str) -> list[str]:
    """Stanford PTB tokenisation as pycocoevalcap uses it, in Python (no Java).

    Lowercase; clitics split off (``man's`` -> ``man 's``, ``don't`` -> ``do n't``);
    hyphenated words, acronyms and times kept whole; punctuation and quotes
    dropped; brackets as ``-lrb-`` and the like.
    """
    text = _CLITIC.sub(r" \1", caption.lower())
    return [_BRACKETS.get(token, token) for token in _PTB_TOKEN.findall(text)
            if token not in _DROPPED]


def tokenize(captions: dict, tokenizer: str) -> dict:
    """``{id: [caption, ...]}`` -> the same with tokenised captions."""
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": c} for c in values]
                                        for key, values in captions.items()})
    if tokenizer == "python":
        return {key: [" ".join(ptb_tokens(c)) for c in values] for key, values in captions.items()}
    raise ValueError(f"tokenizer must be ptb or python, got {tokenizer!r}")


@functools.lru_cache(maxsize=1)
def _meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def caption_metrics(references: dict, hypotheses: dict, metrics=COCO_METRICS,
                    tokenizer: str = "auto") -> dict:
    """Scores of ``hypotheses`` ({id: caption}) against ``references`` ({id: [captions]}).

    Keys: ``bleu1``..``bleu4``, ``meteor``, ``rougeL``, ``cider`` (those asked
    for). ``tokenizer``: ``ptb`` (Java), ``python``, or ``auto`` (``ptb`` when
    Java is installed). METEOR is skipped with a warning without Java.
    """
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "python"
    if "meteor" in metrics and not java_available():
        warnings.warn("METEOR needs Java, which is not installed: METEOR is skipped")
        metrics = [m for m in metrics if m != "meteor"]
    keys = [key for key in references if key in hypotheses]
    if not keys:
        raise ValueError("no image has both references and a hypothesis")
    gts = tokenize({key: references[key] for key in keys}, tokenizer)
    res = tokenize({key: [hypotheses[key]] for key in keys}, tokenizer)
    scores = {}
    for metric in metrics:
        if metric == "bleu":
            from pycocoevalcap.bleu.bleu import Bleu

            values, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores.update({f"bleu{n + 1}": float(v) for n, v in enumerate(values)})
        elif metric == "meteor":
            scores["meteor"] = float(_meteor().compute_score(gts, res)[0])
        elif metric == "rouge":
            from pycocoevalcap.rouge.rouge import Rouge

            scores["rougeL"] = float(Rouge().compute_score(gts, res)[0])
        elif metric == "cider":
            from pycocoevalcap.cider.cider import Cider

            scores["cider"] = float(Cider().compute_score(gts, res)[0])
        else:
            raise ValueError(f"unknown metric {metric!r}; known: {COCO_METRICS}")
    return scores


# ---------------------------------------------------------------- shapes, grounded

_SHAPE_OF_WORD = {**{s: s for s in shapes.SHAPES}, **{p: s for s, p in shapes.PLURALS.items()}}


def mentions(caption: str) -> list[tuple[list[int], str | None, str]]:
    """Object mentions: ``(word indices, colour or None, shape)`` per shape word.

    A mention is a shape word with the size and colour words just before it:
    "a small red circle" -> ([1, 2, 3], "red", "circle"); "two squares" -> ([1], None, "square").
    """
    words = normalize(caption).split()
    found = []
    for i, word in enumerate(words):
        if word not in _SHAPE_OF_WORD:
            continue
        span, colour = [i], None
        j = i - 1
        if j >= 0 and words[j] in shapes.COLOURS:
            colour, span = words[j], [j, *span]
            j -= 1
        if j >= 0 and words[j] in shapes.SIZES:
            span = [j, *span]
        found.append((span, colour, _SHAPE_OF_WORD[word]))
    return found


def named_pairs(caption: str) -> collections.Counter:
    """The (colour, shape) pairs a caption names, as a multiset ("two squares" names none)."""
    return collections.Counter((c, s) for _, c, s in mentions(caption) if c is not None)


def names_exactly(caption: str, objects: list[tuple[str, str]]) -> bool:
    """Whether the caption names exactly ``objects`` ((colour, shape) each), as a multiset."""
    return bool(objects) and named_pairs(caption) == collections.Counter(objects)


def object_metrics(captions: list[str], objects: list[list[tuple[str, str]]]) -> dict:
    """Which errors a captioner makes, over images (``objects``: each image's (colour, shape)s).

    ``content_accuracy``: the share of images whose caption names exactly their
    objects. ``object_precision``: the share of the named colour-shape pairs
    that are in their image; ``object_recall``: the share of the images'
    objects that their caption names (both as multisets, summed over images: a
    caption naming a red circle twice where there is one gets one right of two).
    """
    named = correct = present = 0
    exact = []
    for caption, image in zip(captions, objects):
        pairs, truth = named_pairs(caption), collections.Counter(image)
        named += sum(pairs.values())
        present += sum(truth.values())
        correct += sum((pairs & truth).values())
        exact.append(names_exactly(caption, image))
    return {"content_accuracy": float(np.mean(exact)) if exact else 0.0,
            "object_precision": correct / named if named else 0.0,
            "object_recall": correct / present if present else 0.0}


def box_coverage(boxes: np.ndarray, grid: int, supersample: int = 8) -> np.ndarray:
    """(grid, grid): the share of each cell inside the union of ``boxes``.

    Boxes are (ymin, xmin, ymax, xmax) in 0..1 of the image, as the dataset stores them.
    """
    side = grid * supersample
    centres = (np.arange(side) + 0.5) / side
    inside = np.zeros((side, side), bool)
    for ymin, xmin, ymax, xmax in np.asarray(boxes).reshape(-1, 4):
        inside |= ((centres[:, None] >= ymin) & (centres[:, None] < ymax) &
                   (centres[None, :] >= xmin) & (centres[None, :] < xmax))
    return inside.reshape(grid, supersample, grid, supersample).mean(axis=(1, 3))


def attention_in_boxes(caption: str, alphas: np.ndarray,
                       objects: list[dict]) -> list[tuple[float, float]]:
    """``(mass inside the box, uniform share)`` for every word naming an object of the image.

    ``alphas`` (words, P): the attention under which each word of ``caption``
    was emitted, over a square grid; ``objects``: dicts with ``colour``,
    ``shape`` and ``box``. A mention of something not in the image has no box
    and is left out; one naming several objects ("two squares") uses their union.
    """
    grid = int(round(np.sqrt(alphas.shape[-1])))
    out = []
    for span, colour, shape in mentions(caption):
        boxes = [o["box"] for o in objects
                 if o["shape"] == shape and (colour is None or o["colour"] == colour)]
        if not boxes:
            continue
        coverage = box_coverage(np.asarray(boxes), grid).ravel()
        for index in span:
            if index < len(alphas):
                out.append((float(alphas[index] @ coverage), float(coverage.mean())))
    return out


def grounded_metrics(captions: list[str], alphas: list[np.ndarray],
                     objects: list[list[dict]]) -> dict:
    """``object_metrics``, and ``attention_correctness`` beside ``attention_uniform``."""
    pairs = [pair for caption, alpha, objs in zip(captions, alphas, objects)
             for pair in attention_in_boxes(caption, alpha, objs)]
    named = [[(o["colour"], o["shape"]) for o in objs] for objs in objects]
    return {**object_metrics(captions, named),
            "attention_correctness": float(np.mean([m for m, _ in pairs])) if pairs else 0.0,
            "attention_uniform": float(np.mean([u for _, u in pairs])) if pairs else 0.0,
            "grounded_words": len(pairs)}
