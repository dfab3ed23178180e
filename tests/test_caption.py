"""``jaxcap caption``: JSON lines in order, bad files skipped, attention figures, exact encoder."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxcap import cli
from jaxcap.caption import COLUMNS, LABEL, PANEL, attention_figure, panel_label
from jaxcap.data import shapes
from jaxcap.data.images import load_image
from jaxcap.data.pipeline import FeatureStore
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.runs import load_run


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    spec = shapes.ShapesSpec(image_size=48)
    for i in range(3):
        Image.fromarray(shapes.scene(spec, "test", i).image).save(folder / f"scene{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def _panels(figure: Image.Image) -> int:
    """Panels drawn: slots of the grid that are not blank white."""
    pixels = np.asarray(figure)
    columns, rows = figure.width // PANEL, figure.height // (PANEL + LABEL)
    return sum(pixels[r * (PANEL + LABEL):r * (PANEL + LABEL) + PANEL,
                      c * PANEL:(c + 1) * PANEL].min() < 255
               for r in range(rows) for c in range(columns))


def test_caption_writes_json_lines_skips_bad_files_and_draws_attention(trained_run, photo_dir,
                                                                        tmp_path, capsys):
    out, figures = tmp_path / "captions.jsonl", tmp_path / "attention"
    code = cli.main(["caption", "--workdir", str(trained_run), str(photo_dir),
                     str(tmp_path / "missing.jpg"), "--beam", "2", "--batch-size", "2",
                     "--output", str(out), "--attention-dir", str(figures)])
    assert code == 0
    err = capsys.readouterr().err
    assert "broken.jpg: truncated or corrupt image" in err and "missing.jpg: no such file" in err
    assert "captioned 3 images" in err and "skipped 2" in err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["image"] for line in lines] == [str(photo_dir / f"scene{i}.png") for i in range(3)]
    run = load_run(trained_run)
    search = CaptionSearch(run.image_model, run.image_variables, run.vocabulary,
                           SearchOptions(beam_size=2, max_length=run.config.eval.max_length))
    pixels = np.stack([load_image(photo_dir / f"scene{i}.png", run.config.encoder.image_size)
                       for i in range(3)])
    expected = search(pixels)
    assert [line["caption"] for line in lines] == expected.texts
    np.testing.assert_allclose([line["score"] for line in lines], expected.scores, rtol=1e-5)
    for i, line in enumerate(lines):
        figure = Image.open(figures / f"scene{i}.png")
        words = len(line["caption"].split())
        assert figure.width == min(COLUMNS, words + 1) * PANEL
        assert _panels(figure) == words + 1  # the image, then one panel per word


def test_attention_figure_shades_what_each_word_did_not_attend():
    image = np.full((32, 32, 3), 200, np.uint8)
    alphas = np.zeros((7, 4))
    alphas[np.arange(7), np.arange(7) % 4] = 1.0  # word k looks at cell k % 4 of a 2x2 grid
    figure = np.asarray(attention_figure(image, ["w"] * 7, alphas))
    assert figure.shape == (2 * (PANEL + LABEL), COLUMNS * PANEL, 3)
    assert _panels(Image.fromarray(figure)) == 8
    for k in range(7):
        slot = k + 1
        top, left = (slot // COLUMNS) * (PANEL + LABEL), (slot % COLUMNS) * PANEL
        panel = figure[top:top + PANEL, left:left + PANEL].astype(float).mean(axis=-1)
        quarters = [panel[y * PANEL // 2:(y + 1) * PANEL // 2, x * PANEL // 2:(x + 1) * PANEL // 2]
                    .mean() for y in range(2) for x in range(2)]
        assert int(np.argmax(quarters)) == k % 4
    with pytest.raises(ValueError, match="square"):
        attention_figure(image, ["w"], np.ones((1, 5)) / 5)


def test_captioning_images_equals_decoding_their_cached_features(trained_features_run):
    run = load_run(trained_features_run)
    assert not run.reads_images and run.image_model.encoder is not None
    # What training extracted (the only features-mode run on this data dir).
    store = FeatureStore(next(Path(run.config.dataset.data_dir).glob(
        "jaxcap_features/shapes/*/encoder-*/val")))
    spec = shapes.ShapesSpec(**run.config.dataset.shapes.to_dict())
    names = list(store.rows)[:4]
    index = [int(n.split("_")[-1].split(".")[0]) for n in names]
    pixels = np.stack([load_image(shapes.encode_jpeg(shapes.scene(spec, "val", i).image),
                                  run.config.encoder.image_size) for i in index])
    options = SearchOptions(beam_size=2, max_length=run.config.eval.max_length)
    from_images = CaptionSearch(run.image_model, run.image_variables, run.vocabulary,
                                options)(pixels)
    from_features = CaptionSearch(run.model, run.variables, run.vocabulary, options)(
        np.stack([store[n] for n in names]))
    np.testing.assert_array_equal(from_images.tokens, from_features.tokens)
    np.testing.assert_allclose(from_images.scores, from_features.scores, rtol=1e-4)


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["caption", "--workdir", str(tmp_path), str(tmp_path)]) == 2
    assert "not a jaxcap run directory" in capsys.readouterr().err


def test_a_panel_says_how_much_attention_went_to_the_image_when_not_all_of_it():
    alpha = np.full(4, 0.25, np.float32)
    assert panel_label("red", alpha) == "red"
    assert panel_label("the", alpha * 0.4) == "the (40% image)"
