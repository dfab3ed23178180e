"""Products that accumulate in float32 whatever the compute dtype.

With ``config.dtype = "bfloat16"`` every dense layer, convolution and einsum of
the models takes bfloat16 inputs; these wrappers ask XLA for float32
accumulation (``preferred_element_type``) and round the result to the inputs'
dtype. That is the usual mixed-precision contract, and on CPUs it is also what
makes bfloat16 fast: XLA's CPU backend runs a ``bf16 x bf16 -> f32`` product
on AVX-512 BF16/AMX kernels (about 750 GFLOP/s at 320x2048x2048 on a 2-core
Xeon), but turns a ``bf16 -> bf16`` one into a float32 product behind two
conversions (about 140). In float32 the wrappers change nothing.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

ACCUMULATE = jnp.float32


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
    """``lax.dot_general`` accumulating in float32, the result in the inputs' dtype."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=ACCUMULATE, **kwargs)
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def conv_general_dilated(lhs, rhs, *args, preferred_element_type=None, **kwargs):
    """``lax.conv_general_dilated`` accumulating in float32, the result in the inputs' dtype."""
    out = jax.lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=ACCUMULATE,
                                       **kwargs)
    return out.astype(preferred_element_type or jnp.result_type(lhs, rhs))


def einsum(spec: str, *operands, **kwargs):
    """``jnp.einsum`` accumulating in float32, the result in the operands' dtype."""
    out = jnp.einsum(spec, *operands, preferred_element_type=ACCUMULATE, **kwargs)
    return out.astype(jnp.result_type(*operands))


def Dense(features: int, dtype, **kwargs) -> nn.Dense:  # noqa: N802 (a layer, named like one)
    """``nn.Dense`` computing in ``dtype`` with float32 accumulation; parameters stay float32."""
    return nn.Dense(features, dtype=dtype, dot_general=dot_general, **kwargs)
