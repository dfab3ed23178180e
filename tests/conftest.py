"""Test-wide setup: 4 simulated CPU devices, so every multi-device path runs, and
the rest of the suite's XLA flags (``tests/xla_flags.py``).

XLA reads its flags when JAX initialises its backend, so they are set here, before
any test module imports JAX. Keras runs on the JAX backend (no TensorFlow).
"""

import functools
import gc
import http.server
import os
import shutil
import tempfile
import threading

from tests.xla_flags import with_devices

os.environ["XLA_FLAGS"] = with_devices(os.environ.get("XLA_FLAGS", ""), devices=4)
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA compiling the same few programs again: in each test
# module's process (caches are released between modules, below) and in the processes
# tests start (a killed and resumed run, the distributed pair, the notebook's kernel),
# which inherit this. One persistent compilation cache for the session compiles each
# program once; a cached executable is the same program, so no result changes. Under
# pytest-xdist each worker process has a cache of its own in the session's folder: JAX
# writes an entry in place, without a lock, so a process could read another's half-written
# entry. (A cache of the caller's own, named by JAX_COMPILATION_CACHE_DIR, is kept as it is.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the session's first process
    CACHE_ROOT = tempfile.mkdtemp(prefix="jaxcap-tests-compilation-cache-")
    os.environ["JAXCAP_TESTS_CACHE_ROOT"] = CACHE_ROOT
else:
    CACHE_ROOT = None  # the caller's own, or the session's when this is an xdist worker
if "JAXCAP_TESTS_CACHE_ROOT" in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        os.environ["JAXCAP_TESTS_CACHE_ROOT"], os.environ.get("PYTEST_XDIST_WORKER", "main"))
# Every program is cached: without LLVM's optimisation (tests/xla_flags.py) many compile in
# under the 0.1 s this suite used to cache from, and the processes its tests start compiled
# them again (the suite took 13:35 against 14:20 with that threshold, on the 2-core AMD).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (after the flags above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxcap.convert import init_weights  # noqa: E402


def pytest_configure(config):
    assert jax.local_device_count() == 4, "tests expect 4 simulated devices"


def pytest_unconfigure(config):
    if CACHE_ROOT is not None:
        shutil.rmtree(CACHE_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Each compiled XLA CPU program keeps about ten memory mappings for as long as a
    jit cache holds it; the whole suite in one process compiled enough to pass the
    kernel's 65,530 (vm.max_map_count), and XLA then aborted in the middle of a
    compilation. Each module's programs are released when it ends."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def sample_photos():
    """Real photos bundled with scikit-image: (name, path) pairs."""
    data = pytest.importorskip("skimage.data", reason="scikit-image ships the real test photos")
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg"]
    return [(name, os.path.join(data.data_dir, name)) for name in names]


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory):
    """A small randomly initialised encoder (v1.5, torch preprocessing)."""
    out = tmp_path_factory.mktemp("weights") / "resnet18"
    init_weights(out, depth=18, variant="v1.5", seed=0, log=lambda _: None)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def loopback_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving the folder it returns: (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


TINY_CONFIG = "tiny"  # jaxcap/configs/tiny.py


def _train_tiny(tmp_path_factory, name, *overrides):
    from jaxcap import cli

    data_dir = tmp_path_factory.getbasetemp() / "tiny_datasets"
    workdir = tmp_path_factory.mktemp("runs") / name
    assert cli.main(["train", "--config", TINY_CONFIG, "--workdir", str(workdir),
                     f"--config.dataset.data_dir={data_dir}",
                     "--config.dataset.shapes.num_novel=8", *overrides]) == 0
    return workdir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny shapes run trained end to end (with a novel split), for caption and evaluate."""
    return _train_tiny(tmp_path_factory, "end_to_end")


@pytest.fixture(scope="session")
def trained_features_run(tmp_path_factory):
    """The same on cached features: captioning image files puts the encoder in front."""
    return _train_tiny(tmp_path_factory, "features", "--config.encoder.mode=features",
                       "--config.num_epochs=1")
