"""The ResNet family: shapes, parameter counts, pooling, and the CPU kernels."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcap.models.resnet import (ResNet, adaptive_avg_pool, max_pool, output_channels,
                                  output_size)


def _shapes(module, size):
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    return variables, jax.eval_shape(module.apply, variables, images)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
@pytest.mark.parametrize("variant", ["v1", "v1.5"])
def test_every_depth_gives_the_last_stage_grid(depth, variant):
    _, out = _shapes(ResNet(depth=depth, variant=variant), 224)
    assert out.shape == (2, 7, 7, output_channels(depth, 4))


def test_parameter_count_matches_torchvision_resnet50_without_classifier():
    variables, _ = _shapes(ResNet(depth=50, variant="v1.5"), 64)
    count = sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"]))
    assert count == 25_557_032 - 2_049_000  # torchvision resnet50 minus fc


@pytest.mark.parametrize("size", [224, 225, 97, 448])
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_output_size_predicts_the_grid(size, stage):
    _, out = _shapes(ResNet(depth=18, stage=stage), size)
    assert out.shape[1] == out.shape[2] == output_size(size, stage)
    assert out.shape[3] == output_channels(18, stage)


@pytest.mark.parametrize("height, width, grid", [(14, 14, 7), (7, 7, 3), (10, 13, 4)])
def test_adaptive_pool_matches_torch_bins(height, width, grid, rng):
    x = rng.normal(size=(2, height, width, 5)).astype(np.float32)
    expected = np.zeros((2, grid, grid, 5), np.float32)
    for i in range(grid):
        for j in range(grid):
            rows = slice(i * height // grid, -(-(i + 1) * height // grid))
            cols = slice(j * width // grid, -(-(j + 1) * width // grid))
            expected[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), grid), expected, rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch", reason="torch's own adaptive_avg_pool2d as a second peer")
    theirs = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), grid)
    np.testing.assert_allclose(expected, theirs.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_configuration_is_refused():
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNet(depth=42).init(jax.random.PRNGKey(0), images)
    with pytest.raises(ValueError, match="variant must be one of"):
        ResNet(variant="v2").init(jax.random.PRNGKey(0), images)


@pytest.mark.parametrize("shape,window,stride,pad", [
    ((2, 32, 32, 8), 3, 2, 1),  # ResNet's pool
    ((3, 9, 11, 3), 3, 2, 1),  # odd sizes: the last window is cut by the padding
    ((2, 8, 8, 4), 2, 2, 0),
    ((1, 7, 7, 2), 3, 1, 1),  # stride 1: each input in up to nine windows
])
@pytest.mark.parametrize("values", ["normal", "ties"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_is_flax_max_pool_bit_for_bit_both_ways(shape, window, stride, pad, values,
                                                         dtype, rng):
    # "ties": small integers, so most windows hold their maximum twice or more and the
    # gradient must go where XLA's select-and-scatter sends it. bfloat16: an input in
    # several windows sums their gradients with bfloat16's rounding after each addition.
    x = jnp.asarray(rng.normal(size=shape) if values == "normal"
                    else rng.integers(-2, 3, shape), dtype)

    def flax_pool(x):
        return nn.max_pool(x, (window, window), (stride, stride), ((pad, pad), (pad, pad)))

    def ours(x):
        return max_pool(x, window, stride, pad)

    expected, flax_vjp = jax.vjp(flax_pool, x)
    pooled, our_vjp = jax.vjp(ours, x)
    grad = jnp.asarray(rng.normal(size=expected.shape), dtype)
    np.testing.assert_array_equal(pooled, expected)
    ours_grad = jax.jit(lambda g: our_vjp(g)[0])(grad)
    assert ours_grad.dtype == dtype
    np.testing.assert_array_equal(ours_grad, jax.jit(lambda g: flax_vjp(g)[0])(grad))


def _convolution_kernel(env: dict) -> str:
    """How XLA compiles a 3x3 convolution in a new process with ``env`` after
    ``import jaxcap``: ``"ynnpack"`` or ``"xla"``."""
    program = (
        "import jaxcap, jax, jax.numpy as jnp\n"
        "conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(\n"
        "    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))\n"
        "text = conv.lower(jnp.ones((8, 16, 16, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()\n"
        "print('ynnpack' if '__ynn_fusion' in text else 'xla')\n")
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    return result.stdout.split()[-1]


def test_importing_jaxcap_keeps_cpu_convolutions_on_xla_kernels_unless_the_user_says():
    # YNNPACK ran early 3x3 convolutions' weight gradients 4-5x slower than XLA's
    # own kernels here; the flag jaxcap sets on import must reach the compiler.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    assert _convolution_kernel(env) == "xla"
    own = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
    assert _convolution_kernel({**env, "XLA_FLAGS": own}) == "ynnpack"
