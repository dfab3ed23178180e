"""Weight conversion: parity with the real peers, the file layouts, and every error."""

import hashlib
import os
import shutil

import h5py
import numpy as np
import pytest

from jaxcap import cli, convert
from jaxcap.data.images import load_image
from jaxcap.models.encoder import WeightsError, load_encoder

IMAGE_SIZE = 224


def _photo_folder(tmp_path, sample_photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, path in sample_photos:
        shutil.copy(path, folder / name)
    return folder


def _photo_batch(sample_photos):
    """The photos exactly as jaxcap extract feeds them to the network (sorted by name)."""
    return np.stack([load_image(path, IMAGE_SIZE) for _, path in sorted(sample_photos)])


def _relative_error(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _extract_features(tmp_path, weights, photos):
    out = tmp_path / "features"
    assert cli.main(["extract", "--weights", str(weights), "--images", str(photos),
                     "--out", str(out), "--batch-size", "8", "--quiet"]) == 0
    return np.load(out / "features.npy"), (out / "ids.txt").read_text().split()


# --------------------------------------------------------------------------- Keras


@pytest.fixture(scope="module")
def keras_resnet50(tmp_path_factory):
    """Keras 3 ResNet50 (JAX backend) with random weights and BatchNorm statistics,
    saved by Keras's own legacy HDF5 writer."""
    keras = pytest.importorskip("keras", reason="Keras 3 is the peer for the v1 network")
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.ResNet50(weights=None, include_top=False,
                                        input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, size), rng.normal(0, 0.1, size),
                               rng.normal(0, 0.1, size), rng.uniform(0.5, 1.5, size)])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.05, bias.shape)])
    path = tmp_path_factory.mktemp("keras") / "resnet50_keras3_legacy.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, model)
    return model, path


def _write_keras2_layout(source, target, edit=None):
    """Rewrites a legacy file in the layout of the official Keras 2 file: byte-string
    attributes and ``LAYER/LAYER/weight:0`` datasets. ``edit(layers)`` may change
    ``{layer: {weight: array}}`` first."""
    layers = {}
    with h5py.File(source, "r") as handle:
        for layer in handle.attrs["layer_names"]:
            layer = layer.decode() if isinstance(layer, bytes) else str(layer)
            names = [n.decode() if isinstance(n, bytes) else str(n)
                     for n in handle[layer].attrs["weight_names"]]
            layers[layer] = {name.split("/")[-1]: np.asarray(handle[layer][name])
                             for name in names}
    if edit:
        edit(layers)
    with h5py.File(target, "w") as handle:
        handle.attrs["layer_names"] = np.array([n.encode() for n in layers], dtype="S")
        for layer, weights in layers.items():
            group = handle.create_group(layer)
            group.attrs["weight_names"] = np.array(
                [f"{layer}/{w}:0".encode() for w in weights], dtype="S")
            for weight, value in weights.items():
                group.create_dataset(f"{layer}/{weight}:0", data=value)
    return target


def test_keras_resnet50_parity_through_convert_and_extract(tmp_path, keras_resnet50,
                                                           sample_photos):
    keras = pytest.importorskip("keras")
    model, h5_path = keras_resnet50
    weights = tmp_path / "weights"
    assert cli.main(["convert", "keras", str(h5_path), str(weights)]) == 0
    metadata, _ = load_encoder(weights)
    assert (metadata["depth"], metadata["variant"], metadata["preprocessing"]) == (50, "v1", "caffe")

    ours, ids = _extract_features(tmp_path, weights, _photo_folder(tmp_path, sample_photos))
    pixels = _photo_batch(sample_photos)
    theirs = np.asarray(model.predict(
        keras.applications.resnet.preprocess_input(pixels.astype(np.float32)), verbose=0))
    assert ids == sorted(name for name, _ in sample_photos)
    assert ours.shape == theirs.shape == (len(sample_photos), 7, 7, 2048)
    assert _relative_error(ours, theirs) <= 1e-4


def test_official_keras2_layout_converts_to_the_same_variables(tmp_path, keras_resnet50):
    _, keras3_file = keras_resnet50
    keras2_file = _write_keras2_layout(keras3_file, tmp_path / "official_layout.h5")
    convert.convert_weights("keras", keras3_file, tmp_path / "from3", log=lambda _: None)
    convert.convert_weights("keras", keras2_file, tmp_path / "from2", log=lambda _: None)
    _, from3 = load_encoder(tmp_path / "from3")
    _, from2 = load_encoder(tmp_path / "from2")
    leaves3 = dict(convert._flatten(from3))
    leaves2 = dict(convert._flatten(from2))
    assert leaves3.keys() == leaves2.keys()
    assert len(leaves3) == 53 * 2 + 53 * 4  # 53 convs (kernel, bias), 53 BatchNorms
    for path, value in leaves3.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(leaves2[path]), err_msg=path)


def test_keras_classification_head_is_dropped(tmp_path, keras_resnet50):
    _, keras3_file = keras_resnet50

    def add_head(layers):
        layers["predictions"] = {"kernel": np.zeros((2048, 1000), np.float32),
                                 "bias": np.zeros(1000, np.float32)}

    with_top = _write_keras2_layout(keras3_file, tmp_path / "with_top.h5", add_head)
    out = convert.convert_weights("keras", with_top, tmp_path / "out", log=lambda _: None)
    assert (out / "metadata.json").is_file()


@pytest.mark.parametrize("damage, expected", [
    (lambda layers: layers["conv3_block2_2_conv"].pop("kernel"),
     ["missing tensor for params/stage2_block2/conv2/kernel (shape (3, 3, 128, 128))"]),
    (lambda layers: layers["conv4_block1_0_bn"].update(moving_mean=np.zeros(7, np.float32)),
     ["shape mismatch at batch_stats/stage3_block1/shortcut_bn/mean "
      "(conv4_block1_0_bn/moving_mean): file has (7,), "
      "ResNet-50 v1 needs (1024,)"]),
    (lambda layers: layers.update(mystery_dense={"kernel": np.zeros((2, 2), np.float32)},
                                  conv2_block1_9_conv={"kernel": np.zeros((1,), np.float32)}),
     ["unknown tensor mystery_dense/kernel", "unknown tensor conv2_block1_9_conv/kernel"]),
])
def test_damaged_keras_file_is_refused_naming_each_tensor(tmp_path, keras_resnet50, capsys,
                                                          damage, expected):
    _, keras3_file = keras_resnet50
    damaged = _write_keras2_layout(keras3_file, tmp_path / "damaged.h5", damage)
    out = tmp_path / "out"
    assert cli.main(["convert", "keras", str(damaged), str(out)]) == 2
    message = capsys.readouterr().err
    assert "nothing written" in message
    for line in expected:
        assert line in message
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_not_a_weights_file_is_a_clear_error(tmp_path, capsys):
    bogus = tmp_path / "weights.h5"
    bogus.write_bytes(b"not hdf5 at all")
    assert cli.main(["convert", "keras", str(bogus), str(tmp_path / "out")]) == 2
    assert f"{bogus}: not an HDF5 file" in capsys.readouterr().err


def test_existing_output_is_never_overwritten(tmp_path, keras_resnet50, capsys):
    _, keras3_file = keras_resnet50
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    assert cli.main(["convert", "keras", str(keras3_file), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "user data"


# ---------------------------------------------------------------------- torchvision


@pytest.fixture(scope="module")
def torch_resnet50():
    torch = pytest.importorskip("torch", reason="PyTorch is the peer for the v1.5 network")
    from benchmarks.torch_peers import randomize_batchnorm, resnet

    torch.manual_seed(0)
    model = resnet(50)
    randomize_batchnorm(model, seed=2)
    return model.eval()


def _torch_features(model, pixels):
    import torch

    from jaxcap.models.preprocessing import TORCH_MEAN_RGB, TORCH_STD_RGB
    x = (pixels.astype(np.float32) / 255.0 - np.float32(TORCH_MEAN_RGB)) / np.float32(TORCH_STD_RGB)
    with torch.inference_mode():
        out = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torch_resnet50_parity_through_convert_and_extract(tmp_path, torch_resnet50,
                                                           sample_photos, suffix):
    import torch
    from safetensors.numpy import save_file

    state = {k: v.numpy() for k, v in torch_resnet50.state_dict().items()}
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".pth":
        torch.save(torch_resnet50.state_dict(), path)
    else:
        save_file(state, str(path))
    weights = tmp_path / "weights"
    assert cli.main(["convert", "torchvision", str(path), str(weights)]) == 0
    metadata, _ = load_encoder(weights)
    assert (metadata["depth"], metadata["variant"], metadata["preprocessing"]) == (50, "v1.5", "torch")
    assert metadata["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    ours, _ = _extract_features(tmp_path, weights, _photo_folder(tmp_path, sample_photos))
    theirs = _torch_features(torch_resnet50, _photo_batch(sample_photos))
    assert ours.shape == theirs.shape == (len(sample_photos), 7, 7, 2048)
    assert _relative_error(ours, theirs) <= 1e-4


def test_torchvision_itself_is_the_peer_when_importable(torch_resnet50):
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # it fails with a RuntimeError beside some torch builds
        pytest.skip(f"torchvision does not import here ({type(error).__name__}: {error}); "
                    "the parity test above used the torchvision-named twin in "
                    "benchmarks/torch_peers.py")
    assert hasattr(torch_resnet50, "fc"), "torch_peers.resnet should return torchvision's model"


def test_torch_depth_is_inferred_and_dataparallel_prefix_accepted(tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch builds the ResNet-18 state_dict")
    from benchmarks.torch_peers import resnet

    state = {f"module.{k}": v for k, v in resnet(18).state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "r18.pth")
    out = convert.convert_weights("torchvision", tmp_path / "r18.pth", tmp_path / "out",
                                  log=lambda _: None)
    metadata, _ = load_encoder(out)
    assert metadata["depth"] == 18


def test_torch_missing_and_misshaped_tensors_are_named(tmp_path):
    pytest.importorskip("torch", reason="PyTorch builds the state_dict")
    from safetensors.numpy import save_file

    from benchmarks.torch_peers import resnet

    state = {k: v.numpy() for k, v in resnet(18).state_dict().items()}
    del state["layer2.0.downsample.1.running_var"]
    state["layer4.1.conv2.weight"] = state["layer4.1.conv2.weight"][:, :5]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError) as error:
        convert.convert_weights("torchvision", tmp_path / "bad.safetensors", tmp_path / "out")
    assert "missing tensor for batch_stats/stage2_block1/shortcut_bn/var" in str(error.value)
    assert ("shape mismatch at params/stage4_block2/conv2/kernel (layer4.1.conv2.weight): "
            "file has (3, 3, 5, 512)") \
        in str(error.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- download


def test_download_checksum_mismatch_leaves_nothing(tmp_path, loopback_server, capsys):
    served, base = loopback_server
    (served / "impostor.pth").write_bytes(b"these are not the official weights")
    cache = tmp_path / "cache"
    status = cli.main(["convert", "--download", "torchvision", "--mirror",
                       f"{base}/impostor.pth", "--cache-dir", str(cache), str(tmp_path / "out")])
    assert status == 2
    message = capsys.readouterr().err
    assert "checksum mismatch" in message and convert.OFFICIAL_WEIGHTS["torchvision"]["digest"] in message
    assert list(cache.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_download_verifies_caches_and_converts(tmp_path, loopback_server, monkeypatch):
    torch = pytest.importorskip("torch", reason="PyTorch writes the served .pth file")
    from benchmarks.torch_peers import resnet

    served, base = loopback_server
    torch.save(resnet(18).state_dict(), served / "r18.pth")
    digest = hashlib.sha256((served / "r18.pth").read_bytes()).hexdigest()
    # Pin the served file as if it were the official one; the code path is the real one.
    pin = dict(convert.OFFICIAL_WEIGHTS["torchvision"], digest=digest)
    monkeypatch.setitem(convert.OFFICIAL_WEIGHTS, "torchvision", pin)
    cache = tmp_path / "cache"
    args = ["convert", "--download", "torchvision", "--mirror", f"{base}/r18.pth",
            "--cache-dir", str(cache)]
    assert cli.main(args + [str(tmp_path / "out")]) == 0
    assert [p.name for p in cache.iterdir()] == ["resnet50-0676ba61.pth"]
    (served / "r18.pth").unlink()  # a second conversion must come from the cache
    assert cli.main(args + [str(tmp_path / "out2")]) == 0
    assert load_encoder(tmp_path / "out2")[0]["depth"] == 18


def test_download_from_unreachable_address_is_a_clear_error(tmp_path, capsys):
    status = cli.main(["convert", "--download", "keras", "--mirror", "http://127.0.0.1:9/x.h5",
                       "--cache-dir", str(tmp_path / "cache"), str(tmp_path / "out")])
    assert status == 2
    assert "download of http://127.0.0.1:9/x.h5 failed" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "cache")
