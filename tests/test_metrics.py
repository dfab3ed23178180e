"""Caption metrics equal pycocoevalcap's own evaluation; the grounded shapes metrics are exact."""

import os
from pathlib import Path

import numpy as np
import pytest

from jaxcap import metrics
from jaxcap.data import shapes
from jaxcap.metrics import (attention_in_boxes, box_coverage, caption_metrics, java_available,
                            mentions, names_exactly, object_metrics, ptb_tokens,
                            tokenize)

needs_java = pytest.mark.skipif(not java_available(),
                                reason="pycocoevalcap's PTB tokenizer and METEOR run in Java")

OFFICIAL = Path(__file__).parent / "data" / "dummy_data" / "official"
TOKENS = OFFICIAL / "Flickr8k.token.txt"
HARD = ["A man's dog doesn't jump over the black-and-white fence.",
        "Two dogs (one brown) play, in the snow!",
        'A girl says "hello" at 3.5 p.m. near St. Mary\'s',
        "A boy -- wearing a hat -- runs...", "People at a bar/restaurant & a dog; it's 5:30?",
        "Dogs [running] {fast} in a field", "Mr. Smith's car isn't red; they're U.S. cars"]


def _fixture():
    """References of the Flickr8k fixture; hypotheses: varied edits of one reference each."""
    references = {}
    for line in TOKENS.read_text().splitlines():
        name, caption = line.split("\t")
        references.setdefault(name.split("#")[0], []).append(caption)
    hypotheses = {}
    for k, (name, refs) in enumerate(sorted(references.items())):
        words = refs[k % len(refs)].split()
        hypotheses[name] = " ".join(words[: max(3, len(words) - k % 4)]) + (" ." if k % 2 else "")
    hypotheses[sorted(references)[0]] = "A dog's (brown) ball isn't here"
    return references, hypotheses


@needs_java
def test_python_tokenizer_equals_stanford_ptb_on_real_captions():
    captions = [line.split("\t")[1] for line in TOKENS.read_text().splitlines()] + HARD
    java = tokenize({i: [c] for i, c in enumerate(captions)}, "ptb")
    for i, caption in enumerate(captions):
        assert " ".join(ptb_tokens(caption)) == java[i][0], caption


@needs_java
def test_metrics_equal_coco_eval_cap(monkeypatch):
    """The oracle is pycocoevalcap's COCOEvalCap itself (its own tokenisation and scorers).

    Its METEOR and SPICE are swapped for a scorer returning nothing: SPICE would
    download Stanford models, and METEOR's 12 s JVM is tested separately.
    """
    import pycocoevalcap.eval as coco_eval

    class Unused:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "unused"

    monkeypatch.setattr(coco_eval, "Meteor", Unused)
    monkeypatch.setattr(coco_eval, "Spice", Unused)
    references, hypotheses = _fixture()
    ids = sorted(references)

    class Annotations:  # the two attributes of pycocotools' COCO that COCOEvalCap reads
        def __init__(self, captions):
            self.imgToAnns = {i: [{"image_id": i, "caption": c} for c in captions[i]] for i in ids}

        def getImgIds(self):
            return ids

    oracle = coco_eval.COCOEvalCap(Annotations(references),
                                   Annotations({i: [hypotheses[i]] for i in ids}))
    oracle.evaluate()
    expected = {"bleu1": "Bleu_1", "bleu2": "Bleu_2", "bleu3": "Bleu_3", "bleu4": "Bleu_4",
                "rougeL": "ROUGE_L", "cider": "CIDEr"}
    for tokenizer in ("ptb", "python"):
        ours = caption_metrics(references, hypotheses, ("bleu", "rouge", "cider"), tokenizer)
        assert set(ours) == set(expected)
        for key, name in expected.items():
            assert ours[key] == pytest.approx(oracle.eval[name], rel=1e-9), (tokenizer, key)
    assert 0 < oracle.eval["Bleu_4"] < 1 and oracle.eval["CIDEr"] > 0  # a fixture that can fail


def test_a_perfect_caption_scores_one():
    references = {1: ["a red circle on the left", "one red circle"], 2: ["two blue squares"]}
    scores = caption_metrics(references, {1: "A red circle on the left.", 2: "two blue squares"},
                             ("bleu", "rouge"), tokenizer="python")
    assert scores["bleu1"] == pytest.approx(1.0) and scores["rougeL"] == pytest.approx(1.0)


def test_without_java_meteor_is_skipped_and_python_tokenizes(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    references, hypotheses = _fixture()
    with pytest.warns(UserWarning, match="METEOR needs Java"):
        scores = caption_metrics(references, hypotheses)
    assert set(scores) == {"bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"}
    assert scores == caption_metrics(references, hypotheses, ("bleu", "rouge", "cider"), "python")


@pytest.mark.skipif(os.environ.get("JAXCAP_TEST_METEOR") != "1" or not java_available(),
                    reason="METEOR's JVM takes about 12 s to start: set JAXCAP_TEST_METEOR=1")
def test_meteor_equals_pycocoevalcaps_scorer():
    from pycocoevalcap.meteor.meteor import Meteor

    references, hypotheses = _fixture()
    gts = tokenize(references, "ptb")
    res = tokenize({k: [v] for k, v in hypotheses.items()}, "ptb")
    expected, _ = Meteor().compute_score(gts, res)
    ours = caption_metrics(references, hypotheses, ("meteor",), "ptb")["meteor"]
    assert ours == pytest.approx(expected) and 0 < ours < 1


# ------------------------------------------------------------------------ shapes


def test_mentions_agree_with_the_datasets_own_grounding():
    spec = shapes.ShapesSpec(num_train=200)
    checked = 0
    for scene in shapes.scenes(spec, "train"):
        pairs = [(o["colour"], o["shape"]) for o in scene.objects]
        for caption, grounding in zip(scene.captions, scene.grounding):
            for span, colour, shape in mentions(caption):
                if colour is None or pairs.count((colour, shape)) != 1:
                    continue  # plural or ambiguous: the dataset grounds no single object
                for index in span:
                    assert grounding[index] == pairs.index((colour, shape)), caption
                    checked += 1
    assert checked > 1000


def test_content_accuracy_needs_exactly_the_right_objects():
    objects = [("red", "circle"), ("blue", "star"), ("red", "circle")]
    assert names_exactly("a red circle a small blue star and a large red circle", objects)
    assert not names_exactly("a red circle and a blue star", objects)  # one red circle short
    assert not names_exactly("a red circle a blue square and a red circle", objects)
    assert not names_exactly("three shapes a star and two circles", objects)  # no colours
    assert names_exactly("a green diamond", [("green", "diamond")])


def test_object_precision_and_recall_tell_wrong_objects_from_missing_ones():
    images = [[("red", "circle"), ("blue", "star")],  # two objects
              [("green", "square")],
              [("red", "circle"), ("red", "circle")]]
    captions = ["a red circle and a blue star",  # right: 2 named, 2 in the image
                "a small green triangle",  # a wrong object: 1 named, 0 right, 1 missed
                "a red circle"]  # one of two red circles: 1 right, 1 missed
    scores = object_metrics(captions, images)
    assert scores == {"content_accuracy": pytest.approx(1 / 3),
                      "object_precision": pytest.approx(3 / 4),
                      "object_recall": pytest.approx(3 / 5)}
    # Naming an object twice counts once as right; shapes without a colour name no pair.
    scores = object_metrics(["a red circle and a red circle", "two squares"],
                            [[("red", "circle")], [("blue", "square"), ("red", "square")]])
    assert scores["object_precision"] == pytest.approx(1 / 2)
    assert scores["object_recall"] == pytest.approx(1 / 3)
    assert scores["content_accuracy"] == 0.0


def test_attention_mass_inside_the_named_box():
    objects = [{"colour": "red", "shape": "circle", "box": np.array([0.0, 0.0, 0.5, 0.5])},
               {"colour": "blue", "shape": "square", "box": np.array([0.5, 0.5, 1.0, 1.0])}]
    assert box_coverage(np.array([[0.0, 0.0, 0.5, 0.5]]), 4).sum() == pytest.approx(4.0)
    inside = np.zeros((7, 16))
    inside[:, 0] = 1.0  # top-left cell: inside the red circle, outside the blue square
    caption = "a red circle and a blue square"
    scores = attention_in_boxes(caption, inside, objects)
    assert [m for m, _ in scores] == [1.0, 1.0, 0.0, 0.0]  # red, circle, blue, square
    uniform = attention_in_boxes(caption, np.full((7, 16), 1 / 16), objects)
    assert all(m == pytest.approx(0.25) and u == pytest.approx(0.25) for m, u in uniform)
    assert attention_in_boxes("a green star", inside[:3], objects) == []  # not in the image
