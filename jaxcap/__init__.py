"""jaxcap: image captioning in JAX/Flax."""

import importlib.metadata
import importlib.util
import os

__version__ = "0.2.0"

# XLA's CPU backend (jaxlib 0.10.2) hands each convolution to YNNPACK by default, which
# ran ResNet's 3x3 and 7x7 convolutions 1.2-2.4x slower than XLA's own kernels on the CPU
# measured here, and the weight gradients of the early ones 4-5x slower
# (benchmarks/shapes_bench.py, docs/speed.md): this flag keeps convolutions on
# XLA's kernels (matrix products stay with YNNPACK). Set on
# import, so it holds if jaxcap is imported before JAX starts its backend; a user's own
# setting of the flag wins. Hosts with an accelerator plugin (TPU, GPU) are left alone:
# their convolutions do not run on the CPU, and their XLA reads the same variable.
CPU_CONVOLUTION_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _has_accelerator_plugin() -> bool:
    return (importlib.util.find_spec("libtpu") is not None
            or bool(importlib.metadata.entry_points(group="jax_plugins")))


def _prefer_xla_cpu_convolutions() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags or _has_accelerator_plugin():
        return
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_CONVOLUTION_FLAG}".strip()


_prefer_xla_cpu_convolutions()
