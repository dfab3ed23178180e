"""Every kind of image file becomes correct RGB pixels or a reason to skip it."""

import numpy as np
import pytest
from PIL import Image

from jaxcap.data.images import ImageError, ImageTooLarge, decoded_size, load_image
from tests.image_fixtures import bomb_png, halves, write_every_kind


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


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(every_kind):
    """A decompression bomb (a PNG of a few hundred KB that decodes to 100 Mpx) is refused
    before any pixel is decoded; a photo of 10000 pixels' width is not, since a JPEG
    decodes at the reduced scale its target needs."""
    bomb = bomb_png()
    assert len(bomb) < 500_000 and decoded_size(bomb, 64) == (10_000, 10_000)
    with pytest.raises(ImageTooLarge, match=r"decodes to 10000 x 10000 pixels \(100.0 Mpx\), "
                                            r"over the limit of 40.0 Mpx"):
        load_image(bomb, 64, max_pixels=40_000_000)
    folder, _ = every_kind
    huge = folder / "huge_10000.jpg"
    assert decoded_size(huge, 64)[0] < 10_000 / 4
    assert load_image(huge, 64, max_pixels=2_000_000).shape == (64, 64, 3)
    with pytest.raises(ImageError, match="not a readable image"):
        decoded_size(b"these are not pixels", 64)
