"""What every benchmark shares: the machine it ran on, best-of-N timing, the matmul rate."""

from __future__ import annotations

import functools
import os
import platform
import time

import numpy as np

from jaxcap.models.precision import cpu_flags


# The matrix and vector extensions that decide which kernels the libraries pick:
# PyTorch's oneDNN/MKL and XLA's bfloat16 products run far faster with them.
MATRIX_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict:
    """The machine the figures come from (CPU model and its matrix extensions), and
    how busy it was when they started."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags() or frozenset()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(cpu=cpu, cpu_extensions=" ".join(f for f in MATRIX_EXTENSIONS if f in flags),
                cores=os.cpu_count(), python=platform.python_version(),
                load_average_1min=load)


def machine_line(info: dict) -> str:
    """One line naming the machine, printed beside a benchmark's table."""
    return (f"{info['cpu']} ({info['cores']} cores; {info['cpu_extensions'] or 'no AVX'}), "
            f"load {info['load_average_1min']:.2f} at start")


def best_seconds(run, repetitions: int, warmup: int = 1) -> float:
    """Shortest wall time of ``run()`` over ``repetitions`` after ``warmup`` calls.

    ``run`` must block until its work is done (``block_until_ready`` for JAX).
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def best_seconds_alternating(runs: dict, repetitions: int) -> dict:
    """``best_seconds`` of several contenders, their repetitions taken in turn.

    This machine's speed drifts by 10-20% over minutes; alternating gives every
    contender the same share of the fast and the slow minutes, where timing one
    after the other hands the difference to whichever ran in the fast ones. Each
    turn starts with an untimed call: after its work PyTorch's OpenMP threads
    busy-wait for a while, and XLA timed right after PyTorch measured 10-15%
    slower than alone (not with ``OMP_WAIT_POLICY=PASSIVE``), so the first call
    after a switch absorbs the other side's leftovers.
    """
    times = {name: [] for name in runs}
    for _ in range(repetitions):
        for name, run in runs.items():
            run()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def matmul_gflops(size: int = 2048, repetitions: int = 5, dtype: str = "float32") -> float:
    """This device's matmul rate on a square product, so that a share of it is a share
    of what the device can do: XLA's (bfloat16 operands accumulating in float32 for
    ``dtype='bfloat16'``, as jaxcap's mixed precision multiplies) and, on a CPU in
    float32, the best of it and the BLAS numpy uses."""
    import jax
    import jax.numpy as jnp

    flops = 2.0 * size ** 3
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    a_dev, b_dev = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    seconds = best_seconds(lambda: dot(a_dev, b_dev).block_until_ready(), repetitions)
    if jax.default_backend() == "cpu" and dtype == "float32":
        seconds = min(seconds, best_seconds(lambda: a @ b, repetitions))
    return flops / seconds / 1e9
