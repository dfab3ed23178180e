"""Product by product: XLA's CPU kernels against PyTorch's at the shapes jaxcap runs.

A benchmark's overall ratio says who is faster; this one says where. Each row
is one matrix product or convolution of the training and extraction
benchmarks' workloads, timed in XLA (jitted, exactly the form jaxcap's code
gives it) and in PyTorch (inference mode, the same operands), alternating,
best of several repetitions, on this machine, with its CPU model and matrix
extensions printed. Product forms: ``NN`` is ``x @ w``; ``NT`` is ``x @ w.T``
with ``w`` stored (N, K), as a backward pass reads a weight; ``TN`` is
``x.T @ y``, as a weight gradient is formed. For ``NN`` rows XLA is also timed
with the weight stored transposed (``xla_wt``: ``x @ wt.T``), the layout
jaxcap's soft decoder uses for its context gates in float32. The bfloat16
rows (inputs bfloat16, products accumulated in float32) show what CPUs with
AVX-512 BF16/AMX can do with the opt-in precision.

Importing jaxcap keeps XLA's CPU convolutions on XLA's own kernels (not
YNNPACK's; ``jaxcap.CPU_CONVOLUTION_FLAG``); to time YNNPACK's instead, run with
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution``.

    python benchmarks/shapes_bench.py [--repetitions 5]

The last line printed is one JSON object of the figures: per row, XLA's and
PyTorch's GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import best_seconds_alternating, machine, machine_line  # noqa: E402
from jaxcap.models.resnet import pointwise_conv  # noqa: E402

B, T, H, A, D, V, E = 32, 16, 512, 512, 2048, 3000, 50
FUSED = A + D + 4 * H  # the soft decoder's fused h projection

# (name, M, K, N, form): the training step's products at batch 32, T=16 steps.
PRODUCTS = [
    ("loop: fused h projection", B, H, FUSED, "NN"),
    ("loop: context gates", B, D, 4 * H, "NN"),
    ("loop backward: d_h", B, FUSED, H, "NT"),
    ("loop backward: d_context", B, 4 * H, D, "NT"),
    ("weight gradient: h projection", H, B * T, FUSED, "TN"),
    ("weight gradient: context gates", D, B * T, 4 * H, "TN"),
    ("output layer", B * T, H, V, "NN"),
    ("output layer backward: d_h", B * T, V, H, "NT"),
    ("region projection (once per image)", B * 49, D, A, "NN"),
    ("beam search: context gates (64 images x 5 beams)", 320, D, 4 * H, "NN"),
]
# (name, batch, size, in, out, kernel, stride): ResNet-50 layers at 224x224.
CONVOLUTIONS = [
    ("stem 7x7/2", 8, 224, 3, 64, 7, 2),
    ("stage 1 3x3", 8, 56, 64, 64, 3, 1),
    ("stage 1 1x1 expand", 8, 56, 64, 256, 1, 1),
    ("stage 3 3x3", 8, 14, 256, 256, 3, 1),
    ("stage 4 1x1 reduce", 8, 7, 2048, 512, 1, 1),
]
# The shapes default's encoder (ResNet-18 to stage 2 at 64x64, batch 32), trained end to
# end: each convolution forwards and its weight gradient.
TRAINED_CONVOLUTIONS = [
    ("shapes stem 7x7/2", 32, 64, 3, 64, 7, 2),
    ("shapes stage 1 3x3", 32, 16, 64, 64, 3, 1),
    ("shapes stage 2 3x3", 32, 8, 128, 128, 3, 1),
]


def product_row(name, m, k, n, form, dtype, repetitions):
    import torch

    rng = np.random.default_rng(0)
    shapes = {"NN": ((m, k), (k, n)), "NT": ((m, k), (n, k)), "TN": ((k, m), (k, n))}[form]
    left, right = (rng.standard_normal(s, np.float32) for s in shapes)
    ops = {"NN": lambda x, w: x @ w, "NT": lambda x, w: x @ w.T, "TN": lambda x, w: x.T @ w}
    op = ops[form]
    jdtype, tdtype = (jnp.float32, torch.float32) if dtype == "float32" else \
        (jnp.bfloat16, torch.bfloat16)
    x, w = jnp.asarray(left, jdtype), jnp.asarray(right, jdtype)
    product = jax.jit(lambda x, w: jnp.matmul(*{"NN": (x, w), "NT": (x, w.T),
                                                "TN": (x.T, w)}[form],
                                              preferred_element_type=jnp.float32))
    tx, tw = torch.from_numpy(left).to(tdtype), torch.from_numpy(right).to(tdtype)
    runs = {"xla": lambda: product(x, w).block_until_ready()}
    if form == "NN":
        w_t = jnp.asarray(right.T, jdtype)
        transposed = jax.jit(lambda x, w_t: jnp.matmul(x, w_t.T,
                                                      preferred_element_type=jnp.float32))
        runs["xla_wt"] = lambda: transposed(x, w_t).block_until_ready()

    def run_torch():
        with torch.inference_mode():
            op(tx, tw)

    runs["torch"] = run_torch
    inner = max(1, int(2e9 // (2 * m * k * n)))  # about 2 GFLOP per timed call

    def repeated(run):
        return lambda: [run() for _ in range(inner)]

    seconds = best_seconds_alternating({key: repeated(r) for key, r in runs.items()},
                                       repetitions)
    gflops = {key: round(2.0 * m * k * n * inner / s / 1e9, 1) for key, s in seconds.items()}
    return dict(name=f"{name} ({m}x{k}x{n} {form})", dtype=dtype, **gflops)


def convolution_row(name, batch, size, cin, cout, kernel, stride, repetitions,
                    weight_gradient=False):
    """A convolution forwards, or (``weight_gradient``) the gradient of its weights
    given the output's (in PyTorch, ``torch.nn.grad.conv2d_weight``)."""
    import torch

    rng = np.random.default_rng(0)
    pad = kernel // 2
    out = (size + 2 * pad - kernel) // stride + 1
    images = rng.standard_normal((batch, size, size, cin), np.float32)
    weights = rng.standard_normal((kernel, kernel, cin, cout), np.float32)
    grads = rng.standard_normal((batch, out, out, cout), np.float32)
    # jaxcap's ResNet runs 1x1 convolutions as matrix products (resnet.pointwise_conv).
    conv = pointwise_conv if kernel == 1 else jax.lax.conv_general_dilated

    def forward(x, w):
        return conv(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x, w, g = jnp.asarray(images), jnp.asarray(weights), jnp.asarray(grads)
    tx = torch.from_numpy(images).permute(0, 3, 1, 2)  # NCHW view of NHWC: channels-last
    tw = torch.from_numpy(np.ascontiguousarray(weights.transpose(3, 2, 0, 1)))
    tw = tw.contiguous(memory_format=torch.channels_last)
    tg = torch.from_numpy(grads).permute(0, 3, 1, 2)
    if weight_gradient:
        compute = jax.jit(lambda x, w, g: jax.vjp(lambda w: forward(x, w), w)[1](g)[0])
        run_xla = lambda: compute(x, w, g).block_until_ready()  # noqa: E731

        def run_torch():
            torch.nn.grad.conv2d_weight(tx, tw.shape, tg, stride=stride, padding=pad)
    else:
        compute = jax.jit(forward)
        run_xla = lambda: compute(x, w).block_until_ready()  # noqa: E731

        def run_torch():
            with torch.inference_mode():
                torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad)

    flops = 2.0 * batch * out * out * cout * cin * kernel * kernel
    inner = max(1, int(2e9 // flops))
    runs = {"xla": run_xla, "torch": run_torch}
    seconds = best_seconds_alternating(
        {key: (lambda r=r: [r() for _ in range(inner)]) for key, r in runs.items()}, repetitions)
    gflops = {key: round(flops * inner / s / 1e9, 1) for key, s in seconds.items()}
    what = "conv weight gradient" if weight_gradient else "conv"
    return dict(name=f"{what} {name} ({batch}x{size}x{size}x{cin} -> {cout})", dtype="float32",
                **gflops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    import torch

    info = machine()
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    rows = [product_row(*p, "float32", args.repetitions) for p in PRODUCTS]
    rows += [convolution_row(*c, args.repetitions) for c in CONVOLUTIONS]
    rows += [convolution_row(*c, args.repetitions, weight_gradient=gradient)
             for c in TRAINED_CONVOLUTIONS for gradient in (False, True)]
    rows += [product_row(*p, "bfloat16", args.repetitions) for p in PRODUCTS]
    print("| product | dtype | XLA GFLOP/s | XLA, weight stored transposed | PyTorch GFLOP/s "
          "| XLA / PyTorch |\n| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['name']} | {row['dtype']} | {row['xla']} | {row.get('xla_wt', '')} | "
              f"{row['torch']} | {row['xla'] / row['torch']:.2f} |")
    print(f"machine: {machine_line(info)}")
    print(json.dumps(dict(rows=rows, jax=jax.__version__, torch=torch.__version__, **info)))


if __name__ == "__main__":
    main()
