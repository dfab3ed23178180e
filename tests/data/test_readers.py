"""Readers for each layout, their quirks, and every kind of data mistake."""

import json
import shutil
from pathlib import Path

import pytest

from jaxcap.data import readers
from jaxcap.data.readers import DataError

DUMMY = Path(__file__).parent / "dummy_data"


@pytest.fixture
def copy_of(tmp_path):
    def make(layout):
        return Path(shutil.copytree(DUMMY / layout, tmp_path / layout))
    return make


def test_official_layout_and_the_stray_key():
    result = readers.read(DUMMY / "official")
    assert result.layout == "official"
    assert result.sizes() == {"train": 5, "val": 2, "test": 1}
    first = result.splits["train"][0]
    assert first.image_id == "1000268201_693b08cb0e.jpg" and len(first.captions) == 5
    assert first.path.is_file()
    assert result.dropped == {"captions without an image": 1}  # 2258277193_586949ec62.jpg.1
    assert result.warnings() == ["dropped 1 captions without an image"]


def test_kaggle_layout_draws_and_records_a_seeded_split():
    result = readers.read(DUMMY / "kaggle", seed=3)
    assert result.layout == "kaggle" and result.split_seed == 3
    assert result.sizes() == {"train": 6, "val": 1, "test": 1}
    again = readers.read(DUMMY / "kaggle", seed=3)
    assert [e.image_id for e in again.splits["train"]] == [e.image_id for e in result.splits["train"]]
    other = readers.read(DUMMY / "kaggle", seed=4)
    assert [e.image_id for e in other.splits["test"]] != [e.image_id for e in result.splits["test"]] or \
        [e.image_id for e in other.splits["val"]] != [e.image_id for e in result.splits["val"]]
    rocket = next(e for s in result.splits.values() for e in s if e.image_id.startswith("1003163366"))
    assert "A rocket lifts off , leaving smoke ." in rocket.captions  # quoted comma
    assert "A rocket , seen from afar , climbs ." in rocket.captions  # unquoted commas joined


def test_kaggle_uses_official_split_lists_when_present(copy_of):
    root = copy_of("kaggle")
    for name in ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"):
        shutil.copy(DUMMY / "official" / name, root / name)
    result = readers.read(root)
    assert result.split_seed is None and result.sizes() == {"train": 5, "val": 2, "test": 1}


def test_karpathy_flickr8k_and_coco_with_restval_in_train():
    flickr = readers.read(DUMMY / "karpathy_flickr8k")
    assert flickr.layout == "karpathy" and flickr.sizes() == {"train": 5, "val": 2, "test": 1}
    coco = readers.read(DUMMY / "karpathy_coco")
    assert coco.sizes() == {"train": 4, "val": 2, "test": 2}
    assert coco.splits["train"][1].image_id == "train2014/COCO_train2014_000000000001.jpg"
    assert coco.splits["train"][1].path.is_file()


def _edit_lines(path, edit):
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join(edit(lines)))


@pytest.mark.parametrize("edit, message, kind", [
    (lambda ls: ls[:3] + [b"1000268201_693b08cb0e.jpg#9 no tab here"] + ls[3:],
     r"Flickr8k.token.txt:4: no tab between the key and the caption", "malformed lines"),
    (lambda ls: ls[:3] + [b"1000268201_693b08cb0e.jpg\tno caption number"] + ls[3:],
     r"Flickr8k.token.txt:4: key '1000268201_693b08cb0e.jpg' is not IMAGE#N", "malformed lines"),
    (lambda ls: ls[:3] + [b"1000268201_693b08cb0e.jpg#7\t   "] + ls[3:],
     r"Flickr8k.token.txt:4: empty caption", "empty captions"),
    (lambda ls: ls[:3] + [b"1000268201_693b08cb0e.jpg#8\tA caf\xe9 latte"] + ls[3:],
     r"Flickr8k.token.txt:4: not UTF-8 text", "non-UTF-8 lines"),
    (lambda ls: ls[:3] + [ls[0]] + ls[3:],
     r"Flickr8k.token.txt:4: duplicate key 1000268201_693b08cb0e.jpg#0 \(first on line 1\)",
     "duplicate keys"),
])
def test_token_file_mistakes_name_file_and_line(copy_of, edit, message, kind):
    root = copy_of("official")
    _edit_lines(root / "Flickr8k.token.txt", edit)
    with pytest.raises(DataError, match=message):
        readers.read(root)
    lenient = readers.read(root, strict=False)
    assert lenient.skipped == {kind: 1}
    assert lenient.sizes() == {"train": 5, "val": 2, "test": 1}


def test_split_list_mistakes(copy_of):
    root = copy_of("official")
    _edit_lines(root / "Flickr_8k.devImages.txt", lambda ls: [b"no_such_image.jpg"] + ls)
    with pytest.raises(DataError, match=r"Flickr_8k.devImages.txt:1: names unknown image 'no_such_image.jpg'"):
        readers.read(root)
    _edit_lines(root / "Flickr_8k.testImages.txt", lambda ls: [b"1000268201_693b08cb0e.jpg"] + ls)
    lenient = readers.read(root, strict=False)
    assert lenient.skipped == {"split entries naming unknown images": 1, "duplicate split entries": 1}


def test_images_without_captions_are_dropped_and_counted(copy_of):
    root = copy_of("official")
    _edit_lines(root / "Flickr8k.token.txt",
                lambda ls: [l for l in ls if not l.startswith(b"1012212859_01547e3f17.jpg")])
    result = readers.read(root)
    assert result.dropped["images without captions"] == 1
    assert result.sizes()["test"] == 0


def test_empty_or_missing_folders_are_clear_errors(copy_of, tmp_path):
    root = copy_of("official")
    for image in (root / "Flicker8k_Dataset").iterdir():
        image.unlink()
    with pytest.raises(DataError, match="the image folder is empty"):
        readers.read(root)
    with pytest.raises(DataError, match="no such directory"):
        readers.read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Flickr8k.token.txt, captions.txt or Karpathy"):
        readers.read(tmp_path / "empty")


def test_kaggle_mistakes(copy_of):
    root = copy_of("kaggle")
    _edit_lines(root / "captions.txt", lambda ls: [b"file,text"] + ls[1:])
    with pytest.raises(DataError, match=r"captions.txt:1: expected the header 'image,caption'"):
        readers.read(root)
    _edit_lines(root / "captions.txt", lambda ls: [b"image,caption", b"1000268201_693b08cb0e.jpg,",
                                                   b"just_one_field"] + ls[1:])
    with pytest.raises(DataError, match=r"captions.txt:2: empty caption"):
        readers.read(root)
    assert readers.read(root, strict=False).skipped == {"empty captions": 1, "malformed lines": 1}


def test_karpathy_mistakes(copy_of):
    root = copy_of("karpathy_flickr8k")
    json_path = root / "dataset_flickr8k.json"
    text = json_path.read_text()
    json_path.write_text(text[:200])
    with pytest.raises(DataError, match=r"dataset_flickr8k.json:\d+: not valid JSON"):
        readers.read(root)
    json_path.write_text('{"images": {"not": "a list"}}')
    with pytest.raises(DataError, match=r"the top level should be an object with an 'images' list"):
        readers.read(root)
    json_path.write_text(text.replace('"split": "val"', '"split": "holdout"', 1))
    with pytest.raises(DataError, match=r"images\[5\].split should be train, val, test or restval"):
        readers.read(root)
    json_path.write_text(text)
    (root / "Flicker8k_Dataset" / "1003163366_44323f5815.jpg").unlink()
    with pytest.raises(DataError, match=r"images\[3\]: image file 1003163366_44323f5815.jpg not found"):
        readers.read(root)
    assert readers.read(root, strict=False).skipped == {"missing image files": 1}


def _write_objects(root, objects):
    (root / readers.OBJECTS_FILE).write_text(json.dumps(objects))


def test_objects_json_gives_every_image_its_objects_in_any_layout(copy_of):
    red_circle = {"colour": "red", "shape": "circle", "size": "small",
                  "box": [0.1, 0.2, 0.3, 0.4]}
    for layout in ("official", "kaggle", "karpathy_flickr8k"):
        root = copy_of(layout)
        names = [e.image_id for examples in readers.read(root).splits.values() for e in examples]
        _write_objects(root, {**{n: [red_circle] * (i % 3) for i, n in enumerate(names)},
                              "elsewhere.jpg": [red_circle]})
        result = readers.read(root)
        got = {e.image_id: e.objects for examples in result.splits.values() for e in examples}
        assert got == {n: [red_circle] * (i % 3) for i, n in enumerate(names)}
        assert result.dropped["objects of images not in the dataset"] == 1


def test_objects_json_mistakes(copy_of):
    root = copy_of("official")
    names = [e.image_id for examples in readers.read(root).splits.values() for e in examples]
    good = {"colour": "red", "shape": "circle", "box": [0.1, 0.2, 0.3, 0.4]}
    (root / readers.OBJECTS_FILE).write_text('{"a": [\n  }')
    with pytest.raises(DataError, match=r"objects.json:2: not valid JSON"):
        readers.read(root)
    _write_objects(root, [good])
    with pytest.raises(DataError, match="objects.json: the top level should be an object"):
        readers.read(root)
    _write_objects(root, {n: [good] for n in names[1:]})
    with pytest.raises(DataError, match=f"objects.json: no entry for image {names[0]}"):
        readers.read(root)
    for bad in ({**good, "box": [0.3, 0.2, 0.1, 0.4]}, {**good, "box": [0, 0, 1, 1.5]},
                {**good, "colour": 3}, {"shape": "circle", "box": [0, 0, 1, 1]}, "red circle"):
        _write_objects(root, {n: [good, bad] if n == names[1] else [good] for n in names})
        with pytest.raises(DataError, match=f"objects.json: '{names[1]}': should be a list"):
            readers.read(root)
    # Lenient: the image is left out of its split and counted.
    result = readers.read(root, strict=False)
    assert sum(result.sizes().values()) == len(names) - 1
    assert result.skipped == {"malformed objects": 1}
