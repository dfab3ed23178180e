"""The shapes dataset: captions agree with the pixels, grounding, splits, determinism."""

import hashlib
import json

import numpy as np
import pytest

from jaxcap.data import readers, shapes
from jaxcap.data.text import words

SPEC = shapes.ShapesSpec(seed=5, num_train=150, num_val=20, num_test=20, num_novel=40)


@pytest.fixture(scope="module")
def all_scenes():
    return {split: list(shapes.scenes(SPEC, split)) for split in shapes.SPLITS}


def _nearest_colour(pixel):
    names = list(shapes.COLOURS)
    distances = [np.abs(np.asarray(shapes.COLOURS[n]) - pixel).sum() for n in names]
    return names[int(np.argmin(distances))], min(distances)


def test_drawn_colours_and_positions_match_the_objects(all_scenes):
    size = SPEC.image_size
    for scene in all_scenes["train"]:
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        for obj in scene.objects:
            ymin, xmin, ymax, xmax = np.asarray(obj["box"]) * size
            cy, cx = int((ymin + ymax) / 2), int((xmin + xmax) / 2)
            patch = scene.image[cy - 1: cy + 2, cx - 1: cx + 2].reshape(-1, 3).mean(axis=0)
            colour, distance = _nearest_colour(patch)
            assert colour == obj["colour"] and distance < 90, (scene.image_id, obj, patch)
            # Outside the box, a few pixels away, is background: not the object's colour.
            if xmin > 4:
                outside = scene.image[cy, int(xmin) - 3].astype(int)
                assert np.abs(outside - shapes.COLOURS[obj["colour"]]).sum() > 60


def test_captions_name_the_objects_and_their_relations(all_scenes):
    for scene in all_scenes["train"] + all_scenes["novel"]:
        assert len(scene.captions) == SPEC.captions_per_image
        assert len(set(scene.captions)) == len(scene.captions)
        for caption, grounding in zip(scene.captions, scene.grounding):
            tokens = words(caption)
            assert tokens == caption.split() and len(tokens) == len(grounding)
            for word, target in zip(tokens, grounding):
                if target >= 0:
                    obj = scene.objects[target]
                    assert word in (obj["colour"], obj["shape"], obj["size"]), (caption, word, obj)
                else:
                    assert word not in shapes.COLOURS
            centre_x = [(o["box"][1] + o["box"][3]) / 2 for o in scene.objects]
            centre_y = [(o["box"][0] + o["box"][2]) / 2 for o in scene.objects]
            targets = [g for g in grounding if g >= 0]
            if " to the left of " in caption:
                first, second = targets[0], targets[len(targets) // 2 if len(scene.objects) == 2 else 2]
                assert centre_x[first] < centre_x[second], caption
            if " to the right of " in caption:
                assert centre_x[targets[0]] > centre_x[targets[-1]], caption
            if " above " in caption:
                others = {t for t in targets if t != targets[0]}
                assert centre_y[targets[0]] + 0.1 < min(centre_y[t] for t in others), caption
            count = {1: "one", 2: "two", 3: "three"}[len(scene.objects)]
            if caption.startswith(("two shapes", "three shapes")):
                assert caption.split()[0] == count


def test_novel_split_holds_the_only_held_out_pairs(all_scenes):
    held = set(shapes.held_out_pairs(SPEC))
    assert len(held) == 4
    assert len({c for c, _ in held}) == 4 and len({s for _, s in held}) == 4
    for split in ("train", "val", "test"):
        for scene in all_scenes[split]:
            assert not {(o["colour"], o["shape"]) for o in scene.objects} & held
    for scene in all_scenes["novel"]:
        assert {(o["colour"], o["shape"]) for o in scene.objects} & held
    seen = {(o["colour"], o["shape"]) for s in all_scenes["train"] for o in s.objects}
    assert {c for c, _ in seen} == set(shapes.COLOURS) and {s for _, s in seen} == set(shapes.SHAPES)


def test_variety_of_counts_sizes_and_templates(all_scenes):
    train = all_scenes["train"]
    assert {len(s.objects) for s in train} == {1, 2, 3}
    assert {o["size"] for s in train for o in s.objects} == {"small", "large"}
    openings = {" ".join(c.split()[:2]) for s in train for c in s.captions}
    assert len(openings) > 20


def test_threads_draw_the_same_scenes_in_the_same_order():
    one = list(shapes.scenes(SPEC, "train", threads=1))
    drawn = list(shapes.scenes(SPEC, "train", threads=3, ahead=16))
    assert [s.image_id for s in drawn] == [s.image_id for s in one]
    assert all(np.array_equal(a.image, b.image) and a.captions == b.captions
               for a, b in zip(drawn, one))


# sha256 of the first 25 scenes of each split of the default spec (pixels, then the JSON of
# id, objects, captions and grounding), as drawn when the README's figures were measured.
DEFAULT_SCENES = {
    "texture": "b537c108a706a9e7d0874b5ad95d0d0e85475c0c3eec56ce19231743a5b8421c",
    "photos": "87e9fa449afafb611b10ad05a09f83b1e16f4a4c8dd379acd702694b7497a105",
}


@pytest.mark.parametrize("backgrounds", sorted(DEFAULT_SCENES))
def test_default_scenes_are_those_the_figures_came_from(backgrounds):
    # Drawing may be made faster, never different: every figure measured on shapes
    # depends on these pixels.
    spec = shapes.ShapesSpec(backgrounds=backgrounds)
    digest = hashlib.sha256()
    for split in shapes.SPLITS:
        for index in range(25):
            drawn = shapes.scene(spec, split, index)
            digest.update(drawn.image.tobytes())
            digest.update(json.dumps([drawn.image_id, drawn.objects, drawn.captions,
                                      drawn.grounding]).encode())
    assert digest.hexdigest() == DEFAULT_SCENES[backgrounds]


def test_encoded_scenes_are_the_scenes_with_their_jpeg_files():
    encoded = list(shapes.encoded_scenes(SPEC, "val", threads=2, ahead=4))
    assert [s.image_id for s, _ in encoded] == [s.image_id for s in shapes.scenes(SPEC, "val")]
    for drawn, jpeg in encoded[:3]:
        assert jpeg == shapes.encode_jpeg(drawn.image)


def test_deterministic_from_the_seed():
    a = shapes.scene(SPEC, "val", 3)
    b = shapes.scene(SPEC, "val", 3)
    assert np.array_equal(a.image, b.image) and a.captions == b.captions
    other = shapes.scene(shapes.ShapesSpec(seed=6), "val", 3)
    assert not np.array_equal(a.image, other.image)


def test_photo_backgrounds_keep_the_objects_and_captions(all_scenes):
    spec = shapes.ShapesSpec(seed=5, backgrounds="photos")
    size = spec.image_size
    for index, texture in enumerate(all_scenes["train"][:30]):
        photo = shapes.scene(spec, "train", index)
        assert photo.objects == texture.objects
        assert photo.captions == [c.replace("on a textured background", "on a photo")
                                  for c in texture.captions]
        for obj in photo.objects:  # the object is drawn over the photo in its colour
            ymin, xmin, ymax, xmax = np.asarray(obj["box"]) * size
            cy, cx = int((ymin + ymax) / 2), int((xmin + xmax) / 2)
            patch = photo.image[cy - 1: cy + 2, cx - 1: cx + 2].reshape(-1, 3).mean(axis=0)
            assert _nearest_colour(patch)[0] == obj["colour"], (photo.image_id, obj, patch)
    # The background is a photo: far from the synthetic texture, and not one photo only.
    photos = [shapes.scene(spec, "val", i).image for i in range(12)]
    textures = [s.image for s in all_scenes["val"][:12]]
    assert all(np.abs(p.astype(int) - t).mean() > 20 for p, t in zip(photos, textures))
    corners = {tuple(p[:4, :4].reshape(-1, 3).mean(axis=0).round(-1)) for p in photos}
    assert len(corners) > 6


def test_export_to_the_official_flickr8k_layout_with_objects(tmp_path):
    spec = shapes.ShapesSpec(seed=1, num_train=6, num_val=2, num_test=2, num_novel=2,
                             backgrounds="photos")
    shapes.export_flickr8k_layout(spec, tmp_path)
    result = readers.read(tmp_path)
    assert result.layout == "official"
    assert result.sizes() == {"train": 6, "val": 2, "test": 2}
    assert (tmp_path / "Flickr_8k.novelImages.txt").read_text().count("\n") == 2
    first, scene = result.splits["train"][0], shapes.scene(spec, "train", 0)
    assert first.captions == scene.captions
    assert first.objects == scene.objects  # from objects.json
    assert +result.dropped == {"objects of images not in the dataset": 2}  # the novel split


@pytest.mark.parametrize("change, message", [
    (dict(image_size=0), "image_size must be at least 1, got 0"),
    (dict(num_val=-1), "num_val must be at least 0, got -1"),  # TFDS had failed on it
    (dict(captions_per_image=0), "captions_per_image must be at least 1, got 0"),
    (dict(backgrounds="plain"), "backgrounds must be one of texture, photos, got 'plain'"),
])
def test_a_spec_out_of_range_is_a_data_error_naming_the_setting(change, message):
    with pytest.raises(readers.DataError, match=message):
        shapes.ShapesSpec(**change)
