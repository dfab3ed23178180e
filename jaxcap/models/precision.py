"""Products that accumulate in float32 whatever the compute dtype.

With ``config.dtype = "bfloat16"`` every dense layer, convolution and einsum of
the models takes bfloat16 inputs; these wrappers ask XLA for float32
accumulation (``preferred_element_type``) and round the result to the inputs'
dtype. That is the usual mixed-precision contract, and on CPUs it is also what
makes bfloat16 fast: XLA's CPU backend runs a ``bf16 x bf16 -> f32`` product
on AVX-512 BF16/AMX kernels (about 750 GFLOP/s at 320x2048x2048 on a 2-core
Xeon), but turns a ``bf16 -> bf16`` one into a float32 product behind two
conversions (about 140). In float32 the wrappers change nothing.

Those fast kernels need AVX-512 BF16 or AMX. A CPU with neither runs bfloat16
products no faster than float32 ones and pays for the conversions besides: on
a 2-core AMD EPYC with AVX2, bfloat16 training ran at 64 captions/s against
float32's 103. ``build_captioner`` warns when a run asks for bfloat16 there.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

ACCUMULATE = jnp.float32

# The CPU extensions XLA's CPU backend multiplies bfloat16 operands with (Linux's names).
BFLOAT16_CPU_EXTENSIONS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's feature flags as the kernel lists them, or None where it does not
    (another operating system, an unreadable file)."""
    try:
        with open(cpuinfo) as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def warn_if_bfloat16_is_slow(dtype, cpuinfo: str = "/proc/cpuinfo") -> None:
    """Warns when ``dtype`` is bfloat16, JAX computes on the CPU, and the CPU has
    neither AVX-512 BF16 nor AMX: there bfloat16 is slower than float32."""
    if jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != "cpu":
        return
    flags = cpu_flags(cpuinfo)
    if flags is None or flags & BFLOAT16_CPU_EXTENSIONS:
        return
    warnings.warn("bfloat16 on this CPU is slower than float32: it has neither AVX-512 BF16 "
                  "nor AMX, the extensions XLA's bfloat16 products run fast on (dtype "
                  "float32 computes the same model faster here)", stacklevel=2)


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
