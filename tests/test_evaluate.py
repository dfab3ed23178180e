"""``jaxcap evaluate``: every metric on the split and on novel, the result files, clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxcap import cli
from jaxcap.data import shapes
from jaxcap.data.images import load_image
from jaxcap.data.pipeline import record_text
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.evaluate import decode_split
from jaxcap.metrics import caption_metrics
from jaxcap.runs import load_run
from jaxcap.data.prepare import prepare_dataset
from tests.conftest import _train_tiny


def test_evaluate_reports_coco_and_grounded_metrics_and_writes_results(trained_run, capsys):
    assert cli.main(["evaluate", "--workdir", str(trained_run), "--split", "test", "--beam", "2",
                     "--no-meteor"]) == 0
    table = capsys.readouterr().out
    for label in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D", "content accuracy",
                  "object precision", "object recall", "attention correctness"):
        assert label in table
    report = json.loads((trained_run / "eval_test.json").read_text())
    assert set(report["metrics"]) == {"test", "novel"} and report["search"]["beam_size"] == 2
    for split in ("test", "novel"):
        metrics = report["metrics"][split]
        assert metrics["images"] == 8
        assert {"bleu1", "bleu4", "rougeL", "cider", "content_accuracy", "object_precision",
                "object_recall", "attention_correctness"} <= set(metrics)
        assert "meteor" not in metrics
        results = json.loads((trained_run / f"captions_{split}.json").read_text())
        assert len(results) == 8 and set(results[0]) == {"image_id", "caption"}
    # The figures are those of the written captions against the dataset's references.
    run = load_run(trained_run)
    test = prepare_dataset(run.config).as_data_source("test")
    results = json.loads((trained_run / "captions_test.json").read_text())
    references = {r["image_id"]: [record_text(c) for c in test[i]["captions"]]
                  for i, r in enumerate(results)}
    expected = caption_metrics(references, {r["image_id"]: r["caption"] for r in results},
                               ("bleu", "cider"), report["tokenizer"])
    for key, value in expected.items():
        assert report["metrics"]["test"][key] == pytest.approx(value)


def test_decoding_a_split_equals_captioning_its_images(trained_run):
    run = load_run(trained_run)
    options = SearchOptions(beam_size=3, max_length=run.config.eval.max_length)
    decoded = decode_split(run, "novel", options, batch_size=4)  # two batches of 4
    source = prepare_dataset(run.config).as_data_source("novel")
    pixels = np.stack([load_image(source[i]["image"].tobytes(), run.config.encoder.image_size)
                       for i in range(len(source))])
    expected = CaptionSearch(run.image_model, run.image_variables, run.vocabulary, options)(pixels)
    assert decoded.captions == expected.texts
    assert len(decoded.objects) == 8 and all(decoded.objects)
    for alphas, caption in zip(decoded.alphas, decoded.captions):
        assert alphas.shape[0] == len(caption.split())
        np.testing.assert_allclose(alphas.sum(axis=-1), 1.0, rtol=1e-5)


def test_an_unknown_split_is_a_clear_error(trained_run, capsys):
    assert cli.main(["evaluate", "--workdir", str(trained_run), "--split", "dev",
                     "--no-meteor"]) == 2
    err = capsys.readouterr().err
    assert "no split 'dev'" in err and "novel" in err


@pytest.mark.parametrize("variant", ["none", "hard", "adaptive", "updown", "transformer"])
def test_every_decoder_variant_trains_captions_and_evaluates_from_its_run_directory(
        variant, tmp_path_factory, tmp_path, capsys):
    """``soft`` is the run the tests above use; the others go through the same commands."""
    workdir = _train_tiny(tmp_path_factory, variant, f"--config.decoder.variant={variant}",
                          "--config.encoder.mode=features", "--config.num_train_steps=3")
    photo = tmp_path / "scene.png"
    Image.fromarray(shapes.scene(shapes.ShapesSpec(image_size=32), "test", 0).image).save(photo)
    capsys.readouterr()
    assert cli.main(["caption", "--workdir", str(workdir), str(photo), "--beam", "2",
                     "--attention-dir", str(tmp_path / "attention")]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["image"] == str(photo) and line["caption"]
    assert (tmp_path / "attention" / "scene.png").is_file()
    assert cli.main(["evaluate", "--workdir", str(workdir), "--split", "test", "--beam", "2",
                     "--no-meteor"]) == 0
    report = json.loads((workdir / "eval_test.json").read_text())
    assert report["metrics"]["test"]["images"] == 8
    assert 0 <= report["metrics"]["test"]["attention_correctness"] <= 1
