"""jaxcap export: the whole captioner as one jax.export artifact, equal to CaptionSearch for
every variant and batch size, loaded by one file that needs no jaxcap, refused when a file
of it was changed, and served and used by the commands."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap import cli, configs, exported
from jaxcap.data.images import load_image
from jaxcap.data.text import Vocabulary
from jaxcap.decode import CaptionSearch, SearchOptions
from jaxcap.export import ExportError, ExportedSearch, export_model
from jaxcap.models.captioner import build_captioner
from jaxcap.models.decoders import VARIANTS

SIDE, VOCAB = 32, 30
OPTIONS = SearchOptions(beam_size=3, max_length=10, length_penalty=0.5)


def _random_captioner(variant: str):
    """A tiny captioner (a ResNet-18 cut at stage 2 and ``variant``) with random weights."""
    config = configs.load("tiny")
    config.decoder.update(variant=variant, embed_dim=6, hidden_dim=16, attention_dim=8,
                          dropout=0.0)
    config.decoder.transformer.update(width=16, heads=2, mlp_dim=24, dropout_rate=0.0)
    model = build_captioner(config, VOCAB, {"architecture": "resnet", "depth": 18,
                                            "variant": "v1.5", "preprocessing": "torch"})
    pixels = jnp.zeros((1, SIDE, SIDE, 3), jnp.uint8)
    variables = model.init(jax.random.PRNGKey(1), pixels, jnp.zeros((1, 5), jnp.int32))
    return model, jax.tree.map(np.asarray, variables)


def _vocabulary():
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>", *(f"w{i}" for i in range(VOCAB - 4))])


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 256, (count, SIDE, SIDE, 3), dtype=np.uint8)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_exported_function_equals_caption_search(variant, tmp_path):
    """One artifact, batches of 1, 3 and 17: the same tokens as ``CaptionSearch``, and the
    same scores and attention to float32's rounding."""
    model, variables = _random_captioner(variant)
    out = export_model(model, variables, _vocabulary(), {"image_size": SIDE, "resize": "direct"},
                       OPTIONS, ["cpu"], tmp_path / "artifact")
    captioner = exported.load(out)
    search = CaptionSearch(model, variables, _vocabulary(), OPTIONS, max_batch=32)
    for count in (1, 3, 17):
        pixels = _images(count)
        tokens, scores, alphas = captioner(pixels)
        expected = search(pixels)
        np.testing.assert_array_equal(tokens, expected.tokens)
        np.testing.assert_allclose(scores, expected.scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(alphas, expected.alphas, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, trained_run):
    """The tiny trained run exported for CPU, CUDA and TPU (lowered here, without them)."""
    out = tmp_path_factory.mktemp("exported") / "tiny"
    assert cli.main(["export", "--workdir", str(trained_run), "--out", str(out), "--beam", "2",
                     "--max-length", "12", "--platforms", "cpu,cuda,tpu"]) == 0
    return out


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory, sample_photos):
    folder = tmp_path_factory.mktemp("photos")
    for name, path in sample_photos[:3]:
        shutil.copy(path, folder / name)
    return sorted(folder.iterdir())


def test_the_artifact_describes_itself(artifact, trained_run):
    spec = json.loads((artifact / "captioner.json").read_text())
    assert spec["platforms"] == ["cpu", "cuda", "tpu"]
    assert spec["search"]["beam_size"] == 2 and spec["search"]["max_length"] == 12
    assert spec["preprocessing"] == {"image_size": 32, "resize": "direct",
                                     "normalisation": "torch", "inside": True}
    assert spec["vocabulary"] == Vocabulary.load(trained_run / "vocabulary.json").tokens
    assert set(spec["sha256"]) == {"captioner.jax", "variables.npz"}
    assert spec["run"]["name"] == trained_run.name


def test_the_loader_alone_captions_as_jaxcap_does(artifact, photo_files, tmp_path):
    """``exported.py`` copied alone into a folder, in a process where importing jaxcap
    fails: the captions of real photos (files and an array) equal jaxcap's."""
    shutil.copy(Path(exported.__file__), tmp_path / "exported.py")
    script = (
        "import importlib.abc, json, sys\n"
        "class NoJaxcap(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'jaxcap':\n"
        "            raise ImportError('jaxcap is not available here')\n"
        "sys.meta_path.insert(0, NoJaxcap())\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import numpy as np, exported\n"
        "captioner = exported.load(sys.argv[1])\n"
        "results = captioner.caption(sys.argv[2:])\n"
        "results.append(captioner.caption([np.load(sys.argv[2] + '.npy')])[0])\n"
        "assert not any(m.split('.')[0] == 'jaxcap' for m in sys.modules)\n"
        "print(json.dumps(results))\n")
    files = [str(path) for path in photo_files]
    np.save(files[0] + ".npy", load_image(files[0], 32))
    done = subprocess.run([sys.executable, "-c", script, str(artifact), *files],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    alone = json.loads(done.stdout)
    search = ExportedSearch(artifact)
    expected = search(np.stack([load_image(f, 32) for f in files]))
    assert [r["caption"] for r in alone] == expected.texts + expected.texts[:1]
    np.testing.assert_allclose([r["score"] for r in alone[:3]], expected.scores, rtol=1e-6)


def test_the_commands_caption_and_serve_with_an_artifact(artifact, trained_run, photo_files,
                                                         capsys):
    files = [str(path) for path in photo_files]
    assert cli.main(["caption", "--exported", str(artifact), *files]) == 0
    from_artifact = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert cli.main(["caption", "--workdir", str(trained_run), "--beam", "2", "--max-length",
                     "12", *files]) == 0
    from_run = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["caption"] for r in from_artifact] == [r["caption"] for r in from_run]
    np.testing.assert_allclose([r["score"] for r in from_artifact],
                               [r["score"] for r in from_run], rtol=1e-5, atol=1e-5)
    # Its search is its own: asking for another is an error naming the flag.
    assert cli.main(["caption", "--exported", str(artifact), "--beam", "3", *files]) == 2
    assert "--beam 3: the exported captioner decodes with beam_size=2" in capsys.readouterr().err
    assert cli.main(["export", "--workdir", str(trained_run), "--out", str(artifact)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_a_server_serves_an_artifact_with_its_search_only(artifact, photo_files):
    # Not with capsys: uvicorn's log handlers would hold its buffer past the test.
    files = [str(path) for path in photo_files]
    expected = ExportedSearch(artifact)(np.stack([load_image(f, 32) for f in files])).texts
    pytest.importorskip("fastapi", reason="jaxcap serve needs the [serve] extra")
    import httpx

    from jaxcap.serve import Served, create_app
    from tests.test_serve import serving
    with serving(create_app(Served.of_export(artifact, 8))) as url:
        response = httpx.post(f"{url}/v1/captions", timeout=60, files=[
            ("images", (Path(f).name, Path(f).read_bytes())) for f in files])
        assert response.status_code == 200
        assert [r["caption"] for r in response.json()["results"]] == expected
        other = httpx.post(f"{url}/v1/captions", timeout=60, data={"beam": "3"},
                           files=[("images", ("a.png", Path(files[0]).read_bytes()))])
        assert other.status_code == 422 and "one search only" in other.json()["detail"]
        model = httpx.get(f"{url}/v1/model").json()
        assert model["exported"] == artifact.name and model["platforms"] == ["cpu", "cuda", "tpu"]


@pytest.mark.parametrize("damage", ["changed", "truncated", "missing"])
def test_a_changed_or_truncated_file_is_refused_naming_it(artifact, tmp_path, damage, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    target = copy / ("variables.npz" if damage == "changed" else "captioner.jax")
    data = bytearray(target.read_bytes())
    if damage == "changed":
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(bytes(data[:len(data) // 2]))
    else:
        target.unlink()
    with pytest.raises(exported.ArtifactError, match=target.name):
        exported.load(copy)
    assert cli.main(["caption", "--exported", str(copy), str(artifact / "captioner.json")]) == 2
    assert str(target) in capsys.readouterr().err


def test_export_refuses_sampling_and_unknown_platforms(tmp_path):
    model, variables = _random_captioner("none")
    with pytest.raises(ExportError, match="only greedy and beam search"):
        export_model(model, variables, _vocabulary(), {"image_size": SIDE, "resize": "direct"},
                     SearchOptions(temperature=1.0), ["cpu"], tmp_path / "a")
    with pytest.raises(ExportError, match="each must be one of cpu, cuda, rocm, tpu"):
        export_model(model, variables, _vocabulary(), {"image_size": SIDE, "resize": "direct"},
                     OPTIONS, ["cpu", "gpu"], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
