"""Every kind of image file becomes correct RGB pixels or a reason to skip it."""

import numpy as np
import pytest
from PIL import Image

from jaxcap.data.images import ImageError, load_image
from tests.image_fixtures import halves, write_every_kind


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory, sample_photos):
    folder = tmp_path_factory.mktemp("kinds")
    return folder, write_every_kind(folder, dict(sample_photos)["chelsea.png"])


def test_unusable_files_raise_with_their_reason(every_kind):
    folder, expected = every_kind
    for name, reason in expected.items():
        if reason is None:
            assert load_image(folder / name, 32).shape == (32, 32, 3), name
        else:
            with pytest.raises(ImageError, match=reason):
                load_image(folder / name, 32)


def test_conversions_keep_the_colours(every_kind):
    folder, _ = every_kind
    reference = load_image(folder / "whole.jpg", 48).astype(float)
    for name in ("cmyk.jpg", "rgb16.png", "palette.png"):
        converted = load_image(folder / name, 48).astype(float)
        assert np.abs(converted - reference).mean() < 12, name
    gray = load_image(folder / "gray.png", 48)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert abs(gray.mean() - reference.mean()) < 12


def test_sixteen_bit_gray_is_scaled_not_clipped(every_kind):
    folder, _ = every_kind
    pixels = load_image(folder / "gray16.png", 64)
    # Values run 0..61430 across the image: scaled to 0..239, clipping would give 255 almost everywhere.
    assert pixels.max() <= 240 and pixels.min() <= 2
    assert (pixels == 255).mean() < 0.01


def test_transparent_pixels_show_as_white(every_kind):
    folder, _ = every_kind
    pixels = load_image(folder / "rgba.png", 32)
    assert (pixels[:, :14] == 255).all()


def test_huge_and_tiny_images_resize_correctly(every_kind):
    folder, _ = every_kind
    huge = load_image(folder / "huge_10000.jpg", 64).astype(int)
    np.testing.assert_allclose(huge[:, :28], np.broadcast_to((255, 0, 0), (64, 28, 3)), atol=3)
    np.testing.assert_allclose(huge[:, 36:], np.broadcast_to((0, 0, 255), (64, 28, 3)), atol=3)
    assert (load_image(folder / "one_pixel.png", 16) == (10, 200, 30)).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(halves(64, 32))
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down: displayed rotated by 180 degrees
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = load_image(tmp_path / "rotated.jpg", 32).astype(int)
    assert pixels[:, :12, 2].mean() > 200 and pixels[:, :12, 0].mean() < 50  # blue now on the left


def test_center_crop_keeps_the_middle(tmp_path):
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, 40:80] = (0, 255, 0)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    cropped = load_image(tmp_path / "wide.png", 20, resize="center_crop")
    assert (cropped[:, 1:-1, 1] == 255).all()  # only the outermost columns blend
    squashed = load_image(tmp_path / "wide.png", 20, resize="direct")
    assert squashed[:, 0, 1].max() == 0


def test_unknown_resize_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(tmp_path / "x.png", 8, resize="stretch")
