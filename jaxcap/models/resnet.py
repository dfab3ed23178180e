"""ResNet encoders that reproduce the ImageNet networks people already have.

Two variants, because the two popular weight sources disagree on details that
change every activation:

* ``v1``   — Keras ``ResNet50``: stride on the first 1x1 conv of a downsampling
  bottleneck and on its shortcut, convolutions with bias, BatchNorm epsilon
  1.001e-5.
* ``v1.5`` — torchvision ``resnet50``: stride on the 3x3 conv, no conv bias,
  BatchNorm epsilon 1e-5.

All padding is explicit and symmetric. Flax's ``'SAME'`` pads (0, 1) on an even
input with stride 2 where Keras' ``ZeroPadding2D`` and torch pad (1, 1) or
(3, 3), which silently breaks ported weights.

Parameter names are ``stem_conv``, ``stem_bn`` and ``stage{S}_block{B}`` holding
``conv{K}``/``bn{K}`` and ``shortcut_conv``/``shortcut_bn``, so that both
converters map onto one tree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcap.models import precision as mixed_precision

# Blocks per stage, and whether blocks are bottlenecks (1x1, 3x3, 1x1 with 4x expansion).
STAGE_SIZES = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
STAGE_WIDTHS = (64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """What differs between the two weight conventions."""

    stride_on_first_conv: bool  # bottleneck stride on conv1 (v1) or on conv2 (v1.5)
    conv_bias: bool
    bn_epsilon: float


VARIANTS = {
    "v1": VariantSpec(stride_on_first_conv=True, conv_bias=True, bn_epsilon=1.001e-5),
    "v1.5": VariantSpec(stride_on_first_conv=False, conv_bias=False, bn_epsilon=1e-5),
}


def output_channels(depth: int, stage: int) -> int:
    """Channels of the feature map after ``stage`` (1..4)."""
    _, bottleneck = STAGE_SIZES[depth]
    return STAGE_WIDTHS[stage - 1] * (4 if bottleneck else 1)


def output_size(image_size: int, stage: int) -> int:
    """Spatial size of the feature map after ``stage`` for a square input."""
    size = (image_size + 2 * 3 - 7) // 2 + 1  # stem conv 7x7/2, pad 3
    size = (size + 2 * 1 - 3) // 2 + 1  # max-pool 3x3/2, pad 1
    for _ in range(stage - 1):  # stages 2..4 halve (3x3 or 1x1 conv, stride 2)
        size = (size - 1) // 2 + 1
    return size


def adaptive_avg_pool(x: jnp.ndarray, grid: int) -> jnp.ndarray:
    """Average-pools NHWC ``x`` to ``grid`` x ``grid`` with torch's adaptive bins.

    Bin ``i`` covers rows ``floor(i*H/G) .. ceil((i+1)*H/G)``, so when ``H`` is a
    multiple of ``G`` this is a plain non-overlapping average.
    """
    _, height, width, _ = x.shape

    def pool_matrix(size: int) -> np.ndarray:
        matrix = np.zeros((grid, size), np.float32)
        for i in range(grid):
            start, stop = (i * size) // grid, -((-(i + 1) * size) // grid)
            matrix[i, start:stop] = 1.0 / (stop - start)
        return matrix

    rows, cols = pool_matrix(height), pool_matrix(width)
    return jnp.einsum("gh,nhwc,kw->ngkc", rows.astype(x.dtype), x, cols.astype(x.dtype))


def pointwise_conv(lhs, rhs, window_strides, padding, precision=None, **unused):
    """A 1x1 convolution as a strided slice and a matrix product.

    Same result as ``lax.conv_general_dilated`` on NHWC/HWIO, but XLA's CPU
    backend runs it 4-5x faster as a dot (benchmarks/extract_bench.py), and
    half of ResNet-50's FLOPs are 1x1 convolutions.
    """
    assert rhs.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding), (rhs.shape, padding)
    del unused  # dilations are 1 and there is one feature group in a ResNet
    rows, cols = window_strides
    return mixed_precision.einsum("nhwc,cd->nhwd", lhs[:, ::rows, ::cols, :], rhs[0, 0],
                                  precision=precision)


def _pool_windows(x, window: int, stride: int, pad: int):
    """``{(i, j): x_padded[:, i::stride, j::stride]}`` cut to the output's size: element
    ``(i, j)`` of every pooling window (padding is -inf), in the windows' row-major order."""
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
    rows, cols = ((size + 2 * pad - window) // stride + 1 for size in x.shape[1:3])
    return padded.shape, {(i, j): padded[:, i:i + stride * (rows - 1) + 1:stride,
                                         j:j + stride * (cols - 1) + 1:stride]
                          for i in range(window) for j in range(window)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, pad: int):
    """Square max pooling of NHWC ``x``: ``nn.max_pool`` with -inf padding, bit for bit,
    forwards and backwards, in float32 and bfloat16 (tested), as elementwise maxima of
    strided slices.

    Why: XLA's CPU backend runs the gradient of ``nn.max_pool`` (a select-and-scatter) at
    about 50 ms for ResNet-18's pool on 32 images of 64 pixels, more than the rest of the
    stem's backward pass; written out as below it takes 6 ms (and the forward 1 ms
    instead of 3).
    """
    return functools.reduce(jnp.maximum, _pool_windows(x, window, stride, pad)[1].values())


def _max_pool_forward(x, window, stride, pad):
    pooled = max_pool(x, window, stride, pad)
    return pooled, (x, pooled)


def _max_pool_backward(window, stride, pad, saved, grad):
    """As XLA's select-and-scatter: each window's gradient goes to the first of its
    maxima in row-major order, and an input in several windows sums theirs in the
    windows' row-major order (so the floats are the same)."""
    x, pooled = saved
    dtype = grad.dtype
    rounded = lambda a: a  # noqa: E731
    if dtype != jnp.float32:
        # In float32, rounded to ``dtype`` after every addition: the same bits as adding
        # in ``dtype``, without XLA's CPU backend converting every operand inside one large
        # fusion (in bfloat16 that fusion took 58-64 ms of a shapes training step; the
        # step went from 315-345 to 271-286 ms).
        x, pooled, grad = (a.astype(jnp.float32) for a in (x, pooled, grad))
        finfo = jnp.finfo(dtype)
        rounded = lambda a: jax.lax.reduce_precision(a, finfo.nexp, finfo.nmant)  # noqa: E731
    padded_shape, elements = _pool_windows(x, window, stride, pad)
    taken = jnp.zeros(pooled.shape, bool)
    chosen = {}
    for offset, values in elements.items():
        chosen[offset] = (values == pooled) & ~taken
        taken = taken | chosen[offset]
    zero = jnp.zeros((), grad.dtype)
    total = jnp.zeros(padded_shape, grad.dtype)
    rows, cols = pooled.shape[1:3]
    for i, j in sorted(chosen, reverse=True):  # the larger offset belongs to the earlier window
        total = rounded(total + jax.lax.pad(jnp.where(chosen[i, j], grad, zero), zero, (
            (0, 0, 0),
            (i, padded_shape[1] - i - stride * (rows - 1) - 1, stride - 1),
            (j, padded_shape[2] - j - stride * (cols - 1) - 1, stride - 1),
            (0, 0, 0))))
    return (total[:, pad:pad + x.shape[1], pad:pad + x.shape[2]].astype(dtype),)


max_pool.defvjp(_max_pool_forward, _max_pool_backward)


def _conv_bn(x, name: str, bn_name: str, features: int, kernel: int, strides: int,
             spec: VariantSpec, dtype, train: bool, axis_name: str | None, relu: bool = True):
    """Conv then BatchNorm; must be called inside a compact method (it binds there).

    ``train``: normalise by the batch's statistics (over every device along
    ``axis_name``) and update the running ones; else use the running ones."""
    pad = kernel // 2
    conv = pointwise_conv if kernel == 1 else mixed_precision.conv_general_dilated
    x = nn.Conv(features, (kernel, kernel), (strides, strides),
                padding=((pad, pad), (pad, pad)), use_bias=spec.conv_bias, dtype=dtype,
                conv_general_dilated=conv, name=name)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=axis_name,
                     epsilon=spec.bn_epsilon, dtype=dtype, name=bn_name)(x)
    return nn.relu(x) if relu else x


class Block(nn.Module):
    """A residual block: two 3x3 convolutions (ResNet-18/34), or a bottleneck of
    1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152)."""

    width: int
    strides: int
    bottleneck: bool
    spec: VariantSpec
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        common = dict(spec=self.spec, dtype=self.dtype, train=train, axis_name=self.axis_name)
        if self.bottleneck:
            first, second = ((self.strides, 1) if self.spec.stride_on_first_conv
                             else (1, self.strides))
            out = self.width * 4
            y = _conv_bn(x, "conv1", "bn1", self.width, 1, first, **common)
            y = _conv_bn(y, "conv2", "bn2", self.width, 3, second, **common)
            y = _conv_bn(y, "conv3", "bn3", out, 1, 1, relu=False, **common)
        else:
            out = self.width
            y = _conv_bn(x, "conv1", "bn1", self.width, 3, self.strides, **common)
            y = _conv_bn(y, "conv2", "bn2", self.width, 3, 1, relu=False, **common)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out:
            shortcut = _conv_bn(x, "shortcut_conv", "shortcut_bn", out, 1, self.strides,
                                relu=False, **common)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """A headless ResNet returning the feature grid of ``stage``.

    Input: float NHWC images already normalised for the weights (see
    ``jaxcap.models.preprocessing``). Output: ``(N, H', W', C)``, average-pooled
    to ``grid`` x ``grid`` when ``grid`` is set.
    """

    depth: int = 50
    variant: str = "v1.5"
    stage: int = 4
    grid: int | None = None
    dtype: Any = jnp.float32
    # Training with batch statistics under pmap: the axis they are computed over (so that
    # BatchNorm sees the whole batch, whatever the device count).
    batchnorm_axis: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        if self.variant not in VARIANTS:
            raise ValueError(f"ResNet variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if not 1 <= self.stage <= 4:
            raise ValueError(f"ResNet stage must be 1..4, got {self.stage}")
        spec = VARIANTS[self.variant]
        sizes, bottleneck = STAGE_SIZES[self.depth]

        x = x.astype(self.dtype)
        x = _conv_bn(x, "stem_conv", "stem_bn", 64, 7, 2, spec=spec, dtype=self.dtype,
                     train=train, axis_name=self.batchnorm_axis)
        x = max_pool(x, 3, 2, 1)
        for stage_index, (blocks, width) in enumerate(zip(sizes[:self.stage], STAGE_WIDTHS)):
            for block_index in range(blocks):
                strides = 2 if stage_index > 0 and block_index == 0 else 1
                x = Block(width, strides, bottleneck, spec, self.dtype, self.batchnorm_axis,
                          name=f"stage{stage_index + 1}_block{block_index + 1}")(x, train)
        if self.grid is not None:
            x = adaptive_avg_pool(x, self.grid)
        return x
