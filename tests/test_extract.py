"""jaxcap extract: exact features, bad input skipped and listed, resume, refusal to overwrite."""

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcap import cli, extract as extract_module
from jaxcap.convert import init_weights
from jaxcap.data import images as images_module
from jaxcap.data.images import load_image
from jaxcap.extract import extract
from jaxcap.models.encoder import build_encoder, load_encoder
from jaxcap.models.preprocessing import normalize
from tests.image_fixtures import write_every_kind

SIZE = 64


def _reference(weights, paths, size=SIZE, grid=None):
    """Features computed directly: load_image, normalise, apply on one device."""
    metadata, variables = load_encoder(weights)
    module = build_encoder(metadata, grid=grid)
    pixels = np.stack([load_image(p, size) for p in paths])
    return np.asarray(module.apply(variables, normalize(pixels, metadata["preprocessing"])))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory, sample_photos):
    """Ten real photos (the bundled ones, each twice under another name)."""
    folder = tmp_path_factory.mktemp("photos")
    for copy in ("a", "b"):
        for name, path in sample_photos:
            shutil.copy(path, folder / f"{copy}_{name}")
    return folder


def test_bad_input_never_stops_the_run(tmp_path, resnet18_weights, sample_photos, capsys):
    folder = tmp_path / "mixed"
    expected = write_every_kind(folder, dict(sample_photos)["coffee.png"])
    out = tmp_path / "features"
    assert cli.main(["extract", "--weights", str(resnet18_weights), "--images", str(folder),
                     "--out", str(out), "--image-size", str(SIZE), "--batch-size", "4",
                     "--quiet"]) == 0
    good = sorted(name for name, reason in expected.items() if reason is None)
    bad = sorted(name for name, reason in expected.items() if reason is not None)
    assert (out / "ids.txt").read_text().splitlines() == good
    skipped = dict(line.split("\t") for line in (out / "skipped.tsv").read_text().splitlines())
    assert sorted(skipped) == bad
    for name in bad:
        assert expected[name] in skipped[name], name
    assert f"skipped {len(bad)}" in capsys.readouterr().err
    features = np.load(out / "features.npy", mmap_mode="r")
    np.testing.assert_allclose(features, _reference(resnet18_weights, [folder / n for n in good]),
                               rtol=1e-5, atol=1e-5)
    assert not [p.name for p in out.iterdir() if "partial" in p.name]


def test_batches_split_over_devices_and_last_batch_padded(tmp_path, resnet18_weights, photo_folder):
    record = extract(resnet18_weights, photo_folder, tmp_path / "f", batch_size=6,
                     image_size=SIZE, progress=False, log=lambda _: None)
    assert jax.local_device_count() == 4
    assert record["settings"]["batch_size"] == 8  # rounded up to a multiple of 4 devices
    names = (tmp_path / "f" / "ids.txt").read_text().splitlines()
    assert names == sorted(p.name for p in photo_folder.iterdir())
    features = np.load(tmp_path / "f" / "features.npy")
    np.testing.assert_allclose(features, _reference(resnet18_weights,
                                                    [photo_folder / n for n in names]),
                               rtol=1e-5, atol=1e-5)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, resnet18_weights,
                                                             photo_folder, monkeypatch):
    shutil.copytree(photo_folder, tmp_path / "photos")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    names = sorted(p.name for p in photo_folder.iterdir())
    # An image list, relative to its folder, with a bad and a missing entry mid-way.
    lines = [f"photos/{n}" for n in names[:5]] + ["broken.jpg", "gone.jpg"] + \
            [f"photos/{n}" for n in names[5:]]
    images = tmp_path / "list.txt"
    images.write_text("\n".join(lines) + "\n")
    options = dict(batch_size=4, image_size=SIZE, progress=False, log=lambda _: None)

    extract(resnet18_weights, images, tmp_path / "whole", **options)

    commit = extract_module._commit
    calls = []

    def commit_then_interrupt(*args):
        commit(*args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "_commit", commit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        extract(resnet18_weights, images, tmp_path / "resumed", **options)
    record = json.loads((tmp_path / "resumed" / "extract.json").read_text())
    assert record["done"] == 8 and not record["complete"]
    assert not (tmp_path / "resumed" / "features.npy").exists()
    monkeypatch.setattr(extract_module, "_commit", commit)

    calls.clear()
    counting = lambda *args: (calls.append(1), commit(*args))  # noqa: E731
    monkeypatch.setattr(extract_module, "_commit", counting)
    extract(resnet18_weights, images, tmp_path / "resumed", **options)
    assert len(calls) == 1  # only the batch that was not yet written: 12 lines, 4 per batch

    for name in ("features.npy", "ids.txt", "skipped.tsv"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    assert (tmp_path / "whole" / "skipped.tsv").read_text() == \
        "broken.jpg\tnot a readable image: unknown format or corrupt header\ngone.jpg\tno such file\n"


def test_complete_run_is_not_redone_and_other_settings_are_refused(tmp_path, resnet18_weights,
                                                                   photo_folder, capsys):
    args = ["extract", "--weights", str(resnet18_weights), "--images", str(photo_folder),
            "--out", str(tmp_path / "f"), "--image-size", str(SIZE), "--quiet"]
    assert cli.main(args) == 0
    before = (tmp_path / "f" / "features.npy").read_bytes()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "already complete" in capsys.readouterr().err
    assert cli.main(args[:-3] + ["--image-size", "96", "--quiet"]) == 2
    assert "holds features from other images, weights or settings" in capsys.readouterr().err
    assert (tmp_path / "f" / "features.npy").read_bytes() == before


def test_a_runs_cut_copy_of_the_weights_finds_the_features_of_the_whole_weights(
        tmp_path, resnet18_weights, photo_folder):
    """A run's encoder holds only the stages its model uses; the features of those stages
    are the whole weights' features, and their cache is found again."""
    quiet = dict(image_size=SIZE, stage=2, progress=False, log=lambda _: None)
    extract(resnet18_weights, photo_folder, tmp_path / "f", **quiet)
    whole = (tmp_path / "f" / "features.npy").read_bytes()
    cut = init_weights(tmp_path / "cut", depth=18, variant="v1.5", seed=0, log=lambda _: None,
                       stages=2)  # as resnet18_weights, drawn up to stage 2
    messages = []
    assert extract(cut, photo_folder, tmp_path / "f", **dict(quiet, log=messages.append))[
        "complete"] and "already complete" in messages[-1]
    extract(cut, photo_folder, tmp_path / "g", **quiet)
    assert (tmp_path / "g" / "features.npy").read_bytes() == whole


def test_grid_pooling_and_float16_storage(tmp_path, resnet18_weights, photo_folder):
    extract(resnet18_weights, photo_folder, tmp_path / "f", image_size=128, grid=2,
            dtype="float16", progress=False, log=lambda _: None)
    features = np.load(tmp_path / "f" / "features.npy")
    assert features.shape == (10, 2, 2, 512) and features.dtype == np.float16
    names = (tmp_path / "f" / "ids.txt").read_text().splitlines()
    full = _reference(resnet18_weights, [photo_folder / n for n in names], size=128)
    assert full.shape[1:3] == (4, 4)
    pooled = full.reshape(10, 2, 2, 2, 2, 512).mean(axis=(2, 4))
    np.testing.assert_allclose(features.astype(np.float32), pooled, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such directory or image list"),
    (lambda p: (p.mkdir(), p)[1], "no image files found"),
    (lambda p: (p.write_bytes(b"\xff\xfe bad"), p)[1], "not UTF-8 text"),
])
def test_unusable_image_arguments_are_clear_errors(tmp_path, resnet18_weights, capsys,
                                                   make, message):
    images = make(tmp_path / "images")
    assert cli.main(["extract", "--weights", str(resnet18_weights), "--images", str(images),
                     "--out", str(tmp_path / "f")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--image-size", "0"], "--image-size must be at least 1, got 0"),
    (["--grid", "-2"], "--grid must be at least 1, got -2"),
])
def test_sizes_below_one_are_refused_before_anything_is_written(tmp_path, resnet18_weights,
                                                                 photo_folder, capsys, flags,
                                                                 message):
    out = tmp_path / "f"
    assert cli.main(["extract", "--weights", str(resnet18_weights), "--images",
                     str(photo_folder), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_weights_folder_that_is_not_one_is_a_clear_error(tmp_path, photo_folder, capsys):
    assert cli.main(["extract", "--weights", str(tmp_path), "--images", str(photo_folder),
                     "--out", str(tmp_path / "f")]) == 2
    assert "is not a directory written by 'jaxcap convert'" in capsys.readouterr().err


def _same_result(whole, other):
    for name in ("ids.txt", "skipped.tsv"):
        assert (whole / name).read_bytes() == (other / name).read_bytes(), name
    np.testing.assert_allclose(np.load(other / "features.npy"), np.load(whole / "features.npy"),
                               rtol=1e-6, atol=1e-6)
    assert json.loads((other / "extract.json").read_text())["complete"]
    assert not [p.name for p in other.iterdir() if "partial" in p.name or "retryable" in p.name]


def test_io_errors_are_retried_by_the_next_run_not_skipped(tmp_path, resnet18_weights,
                                                           photo_folder, monkeypatch, capsys):
    args = ["extract", "--weights", str(resnet18_weights), "--images", str(photo_folder),
            "--image-size", str(SIZE), "--batch-size", "4", "--quiet"]
    assert cli.main(args + ["--out", str(tmp_path / "whole")]) == 0
    failing = {"a_coffee.png": OSError(errno.EIO, "Input/output error"),
               "b_rocket.jpg": PermissionError(errno.EACCES, "Permission denied")}
    read = []

    def flaky_load(path, *args, **kwargs):
        read.append(Path(path).name)
        if Path(path).name in failing:
            raise failing[Path(path).name]
        return load_image(path, *args, **kwargs)

    monkeypatch.setattr(images_module, "load_image", flaky_load)
    out = tmp_path / "flaky"
    assert cli.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 files could not be read" in err and "retryable.tsv" in err and "again" in err
    assert (out / "retryable.tsv").read_text() == \
        "a_coffee.png\tInput/output error\nb_rocket.jpg\tPermission denied\n"
    assert not (out / "features.npy").exists()  # not a result with holes in it
    record = json.loads((out / "extract.json").read_text())
    assert record["skipped"] == [] and not record["complete"]

    failing.clear()  # the mount is back
    read.clear()
    assert cli.main(args + ["--out", str(out)]) == 0
    assert sorted(read) == ["a_coffee.png", "b_rocket.jpg"]  # those two, and only them
    _same_result(tmp_path / "whole", out)


KILL_BETWEEN_ROWS_AND_RECORD = """
import os, signal, sys
from jaxcap import extract as module
record_batch = module.write_json_atomic

def kill_once_rows_of_two_batches_are_written(path, record):
    if record["done"] >= 8:  # batch 2's rows are flushed to disk; its record is not written
        os.kill(os.getpid(), signal.SIGKILL)
    record_batch(path, record)

module.write_json_atomic = kill_once_rows_of_two_batches_are_written
weights, images, out, size = sys.argv[1:]
module.extract(weights, images, out, batch_size=4, image_size=int(size), progress=False)
"""


def test_extraction_killed_between_writing_a_batch_and_recording_it_resumes(
        tmp_path, resnet18_weights, photo_folder):
    options = dict(batch_size=4, image_size=SIZE, progress=False, log=lambda _: None)
    extract(resnet18_weights, photo_folder, tmp_path / "whole", **options)
    out = tmp_path / "killed"
    process = subprocess.run([sys.executable, "-c", KILL_BETWEEN_ROWS_AND_RECORD,
                              str(resnet18_weights), str(photo_folder), str(out), str(SIZE)],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert json.loads((out / "extract.json").read_text())["done"] == 4
    assert not (out / "features.npy").exists()
    extract(resnet18_weights, photo_folder, out, **options)
    _same_result(tmp_path / "whole", out)
