"""What every benchmark shares: the machine it ran on, best-of-N timing, the matmul rate."""

from __future__ import annotations

import os
import platform
import time

import numpy as np


def machine() -> dict:
    """The machine the figures come from, and how busy it was when they started."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                load_average_1min=load)


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


def matmul_gflops(size: int = 2048, repetitions: int = 5) -> float:
    """This machine's float32 matmul rate: the best of XLA's and the BLAS numpy uses
    on a square product, so that a share of it is a share of what the cores can do."""
    import jax
    import jax.numpy as jnp

    flops = 2.0 * size ** 3
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    a_dev, b_dev = jnp.asarray(a), jnp.asarray(b)
    xla = best_seconds(lambda: dot(a_dev, b_dev).block_until_ready(), repetitions)
    blas = best_seconds(lambda: a @ b, repetitions)
    return flops / min(xla, blas) / 1e9
