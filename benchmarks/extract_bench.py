"""Images/s of jaxcap extract's model step against PyTorch eager ResNet-50.

Both run ResNet-50 at 224x224, float32, batch 32, on this CPU, in this process:
jaxcap's jitted step exactly as ``jaxcap extract`` builds it (uint8 in,
normalisation and network in one XLA program) and PyTorch eager in inference
mode with channels-last tensors (its fastest CPU layout), alternating. Weights
are random: speed does not depend on their values. Image decoding is not
timed. Also timed: both in the opt-in bfloat16 precision (jaxcap's encoder
with ``dtype=bfloat16``, products accumulating in float32; PyTorch under
``torch.autocast(dtype=bfloat16)``).

    python benchmarks/extract_bench.py [--batch-size 32] [--repetitions 5]

The last line printed is one JSON object of the figures.
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

from benchmarks.common import best_seconds_alternating, machine, machine_line, matmul_gflops  # noqa: E402
from jaxcap.extract import make_feature_fn  # noqa: E402
from jaxcap.models.encoder import build_encoder  # noqa: E402

SIZE = 224


def jaxcap_run(batch_size: int, dtype=np.float32):
    """Returns (run, FLOPs per image as XLA counts them)."""
    metadata = dict(architecture="resnet", depth=50, variant="v1.5", preprocessing="torch")
    module = build_encoder(metadata, dtype=dtype)
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
    step = make_feature_fn(module, variables, "torch", np.float32, jax.local_devices())
    images = np.random.default_rng(0).integers(0, 256, (batch_size, SIZE, SIZE, 3), np.uint8)
    flops = jax.jit(lambda x: module.apply(variables, x)).lower(
        images.astype(np.float32)).compile().cost_analysis()["flops"]
    return (lambda: step(images).block_until_ready()), flops / batch_size


def torch_run(batch_size: int, bfloat16: bool = False, device: str = "cpu"):
    import torch

    from benchmarks.torch_peers import resnet

    model = resnet(50).eval().to(device, memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, SIZE, SIZE, device=device).to(
        memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bfloat16):
            model(images)
        if device != "cpu":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    info = machine()
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    peak = matmul_gflops()
    ours, flops_per_image = jaxcap_run(args.batch_size)
    ours_bf16, _ = jaxcap_run(args.batch_size, jnp.bfloat16)
    seconds = best_seconds_alternating(
        {"jaxcap": ours, "torch": torch_run(args.batch_size), "jaxcap_bf16": ours_bf16,
         "torch_bf16": torch_run(args.batch_size, bfloat16=True)}, args.repetitions)
    ours, theirs, ours_bf16, theirs_bf16 = (
        args.batch_size / seconds[name] for name in ("jaxcap", "torch", "jaxcap_bf16",
                                                     "torch_bf16"))
    figures = dict(
        jaxcap_images_per_s=round(ours, 2),
        torch_images_per_s=round(theirs, 2),
        ratio_vs_torch=round(ours / theirs, 3),
        jaxcap_bf16_images_per_s=round(ours_bf16, 2),
        torch_bf16_images_per_s=round(theirs_bf16, 2),
        bf16_ratio_vs_torch_bf16=round(ours_bf16 / theirs_bf16, 3),
        matmul_gflops=round(peak, 1),
        gflops_per_image=round(flops_per_image / 1e9, 2),
        share_of_matmul_peak=round(ours * flops_per_image / (peak * 1e9), 3),
        batch_size=args.batch_size, image_size=SIZE, dtype="float32",
        jax=jax.__version__, torch=__import__("torch").__version__, **info)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
