"""Test-wide setup: 4 simulated CPU devices, so every multi-device path runs.

XLA reads the flag when JAX initialises its backend, so it is set here, before
any test module imports JAX. Keras runs on the JAX backend (no TensorFlow).
"""

import functools
import http.server
import os
import threading

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4"]).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxcap.convert import init_weights  # noqa: E402


def pytest_configure(config):
    assert jax.local_device_count() == 4, "tests expect 4 simulated devices"


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
