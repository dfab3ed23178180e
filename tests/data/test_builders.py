"""TFDS builders on dummy data: array_record files read back with tfds.data_source."""

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxcap import cli
from jaxcap.data import builders, shapes
from jaxcap.data.images import load_image
from jaxcap.data.readers import DataError

DUMMY = Path(__file__).parent / "dummy_data"


def _records(split_source):
    return sorted((split_source[i] for i in range(len(split_source))), key=lambda r: r["image_id"])


@pytest.mark.parametrize("layout", ["official", "kaggle", "karpathy_flickr8k"])
def test_flickr8k_builds_from_every_layout(tmp_path, layout):
    built = builders.prepare("flickr8k", tmp_path / "data", DUMMY / layout)
    sizes = builders.split_sizes(built)
    assert sum(sizes.values()) == 8
    assert sizes == ({"train": 6, "val": 1, "test": 1} if layout == "kaggle"
                     else {"train": 5, "val": 2, "test": 1})
    assert list((tmp_path / "data" / "flickr8k" / "1.0.0").glob("*.array_record-*"))
    source = tfds.data_source("flickr8k", data_dir=str(tmp_path / "data"),
                              builder_kwargs=dict(file_format="array_record"))
    records = _records(source["train"])
    first = records[0]
    assert first["image_id"] in (b"1000268201_693b08cb0e.jpg", "1000268201_693b08cb0e.jpg")
    assert len(first["captions"]) >= 5
    image_dir = "Images" if layout == "kaggle" else "Flicker8k_Dataset"
    original = (DUMMY / layout / image_dir / "1000268201_693b08cb0e.jpg").read_bytes()
    assert first["image"].tobytes() == original  # the file's bytes, unchanged
    assert load_image(first["image"].tobytes(), 32).shape == (32, 32, 3)
    assert first["objects"]["box"].shape == (0, 4) and first["grounding"].shape == (0, 0)
    if layout == "kaggle":
        assert built.info.metadata["split_seed"] == 0
        assert sorted(built.info.metadata["drawn_split"]["val"]) == \
            sorted(r["image_id"].decode() for r in _records(source["val"]))


def test_karpathy_coco_builds(tmp_path):
    built = builders.prepare("coco", tmp_path / "data", DUMMY / "karpathy_coco")
    assert builders.split_sizes(built) == {"train": 4, "val": 2, "test": 2}


def test_unusable_image_is_an_error_in_strict_mode_and_skipped_in_lenient(tmp_path):
    root = Path(shutil.copytree(DUMMY / "official", tmp_path / "official"))
    (root / "Flicker8k_Dataset" / "1001773457_577c3a7d70.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    with pytest.raises(DataError, match="1001773457_577c3a7d70.jpg: unusable image"):
        builders.prepare("flickr8k", tmp_path / "strict", root)
    built = builders.prepare("flickr8k", tmp_path / "lenient", root, strict=False)
    assert builders.split_sizes(built)["train"] == 4


def test_shapes_builds_with_grounding_and_novel_split(tmp_path):
    spec = shapes.ShapesSpec(seed=2, image_size=64, num_train=12, num_val=4, num_test=4, num_novel=6)
    built = builders.prepare("shapes", tmp_path / "data", spec=spec)
    assert builders.split_sizes(built) == {"train": 12, "val": 4, "test": 4, "novel": 6}
    assert [list(p) for p in built.info.metadata["held_out_pairs"]] == \
        [list(p) for p in shapes.held_out_pairs(spec)]
    records = _records(built.as_data_source()["novel"])
    scene = shapes.scene(spec, "novel", 0)
    record = records[0]
    assert [c.decode() for c in record["captions"]] == scene.captions
    np.testing.assert_allclose(record["objects"]["box"], [o["box"] for o in scene.objects], rtol=1e-6)
    for row, words in zip(record["grounding"], scene.grounding):
        assert list(row[: len(words)]) == words and (row[len(words):] == builders.GROUNDING_PAD).all()
    pixels = load_image(record["image"].tobytes(), 64)
    assert np.abs(pixels.astype(int) - scene.image).mean() < 8  # JPEG of the drawn, noisy scene


def test_flickr8k_layout_with_objects_builds_grounded_records(tmp_path, capsys):
    """shapes on photos, exported to the Flickr8k layout and built as flickr8k, carries its
    objects into the records (what evaluation's grounded metrics read)."""
    root = tmp_path / "shapes8k"
    assert cli.main(["prepare", "shapes", "--backgrounds", "photos", "--image-size", "64",
                     "--num-train", "5", "--num-val", "2", "--num-test", "2", "--num-novel", "1",
                     "--export-flickr8k", str(root)]) == 0
    assert "photos backgrounds" in capsys.readouterr().out
    built = builders.prepare("flickr8k", tmp_path / "data", root)
    assert builders.split_sizes(built) == {"train": 5, "val": 2, "test": 2}
    spec = shapes.ShapesSpec(image_size=64, num_train=5, num_val=2, num_test=2, num_novel=1,
                             backgrounds="photos")
    for record in _records(built.as_data_source()["val"]):
        scene = shapes.scene(spec, "val", int(record["image_id"][-10:-4]))
        assert [c.decode() for c in record["captions"]] == scene.captions
        assert [c.decode() for c in record["objects"]["colour"]] == \
            [o["colour"] for o in scene.objects]
        np.testing.assert_allclose(record["objects"]["box"], [o["box"] for o in scene.objects],
                                   rtol=1e-6)


def test_prepare_command_prints_split_sizes(tmp_path, capsys):
    assert cli.main(["prepare", "flickr8k", "--manual-dir", str(DUMMY / "official"),
                     "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "train        5 images" in out.out and "val          2 images" in out.out
    assert "dropped 1 captions without an image" in out.err


def test_prepare_command_reports_data_mistakes_without_traceback(tmp_path, capsys):
    root = Path(shutil.copytree(DUMMY / "official", tmp_path / "official"))
    (root / "Flickr8k.token.txt").write_text("no tab on this line\n")
    assert cli.main(["prepare", "flickr8k", "--manual-dir", str(root),
                     "--data-dir", str(tmp_path / "data")]) == 2
    assert "Flickr8k.token.txt:1: no tab between the key and the caption" in capsys.readouterr().err


def test_a_manual_dir_that_is_not_there_is_an_error_until_the_dataset_is_built(tmp_path,
                                                                                capsys):
    missing = tmp_path / "Flickr8K"  # a typo: nothing is downloaded in its place
    assert cli.main(["prepare", "flickr8k", "--manual-dir", str(missing),
                     "--data-dir", str(tmp_path / "data")]) == 2
    assert f"{missing}: the manual dir" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
    builders.prepare("flickr8k", tmp_path / "data", DUMMY / "official")
    # Built: the dataset is read from its array_record files, the raw files may be gone.
    built = builders.prepare("flickr8k", tmp_path / "data", missing)
    assert builders.split_sizes(built) == {"train": 5, "val": 2, "test": 1}


def test_flickr8k_downloads_the_official_archives_without_a_manual_dir(tmp_path, loopback_server,
                                                                      monkeypatch):
    served, base = loopback_server
    with zipfile.ZipFile(served / "Flickr8k_Dataset.zip", "w") as bundle:
        for image in (DUMMY / "official" / "Flicker8k_Dataset").iterdir():
            bundle.write(image, f"Flicker8k_Dataset/{image.name}")
    with zipfile.ZipFile(served / "Flickr8k_text.zip", "w") as bundle:
        for text in (DUMMY / "official").glob("*.txt"):
            bundle.write(text, text.name)
    monkeypatch.setitem(builders.FLICKR8K_ARCHIVES, "images", f"{base}/Flickr8k_Dataset.zip")
    monkeypatch.setitem(builders.FLICKR8K_ARCHIVES, "text", f"{base}/Flickr8k_text.zip")
    built = builders.prepare("flickr8k", tmp_path / "data")
    assert builders.split_sizes(built) == {"train": 5, "val": 2, "test": 1}
