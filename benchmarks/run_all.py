"""Extraction, training and beam search on whatever device JAX finds, in one table.

The three workloads of ``extract_bench.py``, ``train_bench.py`` and
``decode_bench.py`` (the same models, data and PyTorch peers, imported from
them), sized for the device: on a CPU the batch of 32 the seed trains with; on
a GPU or TPU also a batch that fills the device, since that is how they are
run there. Each in float32 and in the opt-in bfloat16 precision (products on
bfloat16 operands accumulating in float32; parameters float32), against the
PyTorch peer on the same device where PyTorch can reach it (CPU; CUDA GPUs
with a CUDA build of PyTorch): channels-last ResNet-50, the tutorial's decoder
trained with the projection hoisted, the batched beam search; in bfloat16
under ``torch.autocast``. Decoding is timed twice on captions of Flickr8k's
lengths: one batch in one call (``decode``), and a stream of 4 batches through
as many slots as a batch has images, the continuous search against the
batched peer batch by batch (``decode_stream``).

Per row: throughput, the peer's and the ratio; the model FLOP/s achieved (the
FLOPs each benchmark counts as the work done); its share of the matmul rate
measured on this device in that precision (a square product, see
``common.matmul_gflops``); and, for bfloat16 on accelerators whose data sheet
is known, the model FLOPs utilisation against that nominal dense peak (MFU).

    python benchmarks/run_all.py [--repetitions N]

The table goes to stderr; the last line printed is one JSON object with the
same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import decode_bench, extract_bench, train_bench  # noqa: E402
from benchmarks.common import best_seconds_alternating, machine, machine_line, matmul_gflops  # noqa: E402

# Per backend: batch sizes (the seed's 32, then one that fills the device), training
# steps per timed call, repetitions, and the side of the square product for the rate.
SIZES = {
    "cpu": dict(extract=(32,), train=(32,), decode=(64,), train_steps=10, repetitions=3,
                matmul=2048),
    "gpu": dict(extract=(32, 256), train=(32, 512), decode=(64, 1024), train_steps=10,
                repetitions=5, matmul=8192),
    "tpu": dict(extract=(32, 256), train=(32, 1024), decode=(64, 1024), train_steps=10,
                repetitions=5, matmul=8192),
}

# Dense bfloat16 peaks from the vendors' data sheets, TFLOP/s per JAX device (a TPU v2
# or v3 device is one core, half a chip; later TPUs show one device per chip). Matched
# in order against ``device_kind``; the H100 figure is the SXM part's.
NOMINAL_BF16_TFLOPS = (("TPU v2", 22.5), ("TPU v3", 61.5), ("TPU v4", 275.0),
                       ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
                       ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("H200", 989.0),
                       ("H100", 989.0), ("A100", 312.0), ("L4", 121.0))


def nominal_bf16_tflops(device_kind: str) -> float | None:
    return next((peak for name, peak in NOMINAL_BF16_TFLOPS if name in device_kind), None)


def torch_device(backend: str) -> str | None:
    """Where the PyTorch peer runs beside JAX's device, or None when it cannot."""
    try:
        import torch
    except ImportError:
        return None
    if backend == "cpu":
        return "cpu"
    return "cuda" if backend == "gpu" and torch.cuda.is_available() else None


def _rates(batch: int, runs: dict, repetitions: int) -> dict:
    seconds = best_seconds_alternating(runs, repetitions)
    return {name: batch / value for name, value in seconds.items()}


def extract_rows(batches, peer, repetitions):
    for batch in batches:
        runs, flops = {}, None
        for dtype in ("float32", "bfloat16"):
            runs[f"jaxcap_{dtype}"], flops = extract_bench.jaxcap_run(batch, jnp.dtype(dtype))
            if peer:
                runs[f"torch_{dtype}"] = extract_bench.torch_run(
                    batch, bfloat16=dtype == "bfloat16", device=peer)
        rates = _rates(batch, runs, repetitions)
        for dtype in ("float32", "bfloat16"):
            yield dict(benchmark="extract", unit="images/s", dtype=dtype, batch=batch,
                       jaxcap=rates[f"jaxcap_{dtype}"], torch=rates.get(f"torch_{dtype}"),
                       flops_per_item=flops)


def train_rows(batches, steps, peer, repetitions):
    for batch in batches:
        data = train_bench.batches(steps, batch=batch)
        runs = {f"jaxcap_{dtype}": train_bench.jaxcap_run(data, dtype=dtype)
                for dtype in ("float32", "bfloat16")}
        if peer:  # PyTorch's bfloat16 training (autocast with a scaler) is not compared
            runs["torch_float32"] = train_bench.torch_run(data, hoist=True, device=peer)
        rates = _rates(batch * steps, runs, repetitions)
        decoder_steps = float(np.mean([b["tokens"].shape[1] - 1
                                       for b in train_bench.bucketed(data)]))
        for dtype in ("float32", "bfloat16"):
            yield dict(benchmark="train", unit="captions/s", dtype=dtype, batch=batch,
                       jaxcap=rates[f"jaxcap_{dtype}"], torch=rates.get(f"torch_{dtype}"),
                       flops_per_item=train_bench.train_flops_per_caption(decoder_steps))


# The continuous search's workload: a stream of this many batches' images through a
# batch's worth of slots, against the batched peer in batches of that size.
STREAM_BATCHES = 4


def decode_rows(batches, peer, repetitions):
    """``decode``: one batch in one call (``CaptionSearch``); ``decode_stream``:
    ``STREAM_BATCHES`` batches through as many slots as a batch has images
    (``ContinuousSearch``). Captions of Flickr8k's lengths (``decode_bench``)."""
    from benchmarks.torch_peers import batched_beam_search
    from jaxcap.data.text import END_ID, PAD_ID, START_ID

    for images in batches:
        variables, _ = decode_bench.jaxcap_variables(STREAM_BATCHES * images)
        for benchmark, count, continuous in (("decode", images, False),
                                             ("decode_stream", STREAM_BATCHES * images, True)):
            runs, found = {}, {}
            for dtype in ("float32", "bfloat16"):
                search, params, features = decode_bench.jaxcap_search(
                    count, dtype, images, continuous, variables)
                runs[f"jaxcap_{dtype}"] = (lambda s=search, f=features, d=dtype:
                                           found.__setitem__(d, s(f)))
            if peer:
                import torch

                decoder = decode_bench.torch_decoder(params).to(peer)
                grid = torch.from_numpy(features).to(peer)
                for dtype in ("float32", "bfloat16"):
                    def run(bf16=dtype == "bfloat16"):
                        with torch.no_grad(), torch.autocast(peer, torch.bfloat16,
                                                             enabled=bf16):
                            for start in range(0, count, images):
                                batched_beam_search(decoder, grid[start:start + images],
                                                    decode_bench.BEAM, decode_bench.MAX_LENGTH,
                                                    (PAD_ID, START_ID), START_ID, END_ID, PAD_ID)
                        if peer != "cpu":
                            torch.cuda.synchronize()
                    runs[f"torch_{dtype}"] = run
            rates = _rates(count, runs, repetitions)
            for dtype in ("float32", "bfloat16"):
                steps = float(np.mean([(row != PAD_ID).sum() - 1
                                       for row in found[dtype].tokens]))
                yield dict(benchmark=benchmark, unit="captions/s", dtype=dtype, batch=images,
                           jaxcap=rates[f"jaxcap_{dtype}"], torch=rates.get(f"torch_{dtype}"),
                           flops_per_item=decode_bench.beam_flops_per_caption(
                               int(round(steps))))


def finish(row: dict, rate_gflops: dict, nominal: float | None) -> dict:
    achieved = row["jaxcap"] * row["flops_per_item"] / 1e9
    mfu = achieved / (nominal * 1e3) if nominal and row["dtype"] == "bfloat16" else None
    return dict(benchmark=row["benchmark"], dtype=row["dtype"], batch=row["batch"],
                unit=row["unit"], jaxcap=round(row["jaxcap"], 2),
                torch=None if row["torch"] is None else round(row["torch"], 2),
                ratio_vs_torch=None if row["torch"] is None else
                round(row["jaxcap"] / row["torch"], 2),
                model_gflops_per_s=round(achieved, 1),
                share_of_matmul_rate=round(achieved / rate_gflops[row["dtype"]], 3),
                mfu=None if mfu is None else round(mfu, 4))


def table(rows: list[dict]) -> str:
    header = ("benchmark", "dtype", "batch", "unit", "jaxcap", "torch", "ratio", "GFLOP/s",
              "of matmul rate", "MFU")
    keys = ("benchmark", "dtype", "batch", "unit", "jaxcap", "torch", "ratio_vs_torch",
            "model_gflops_per_s", "share_of_matmul_rate", "mfu")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row[k] is None else str(row[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int,
                        help="per contender (default: 3 on a CPU, 5 on an accelerator)")
    args = parser.parse_args()
    started = time.perf_counter()
    backend = jax.default_backend()
    sizes = SIZES.get(backend, SIZES["gpu"])
    repetitions = args.repetitions or sizes["repetitions"]
    device = jax.devices()[0]
    info = machine()
    peer = torch_device(backend)
    print(f"device: {jax.device_count()} x {device.device_kind} ({backend}); host "
          f"{machine_line(info)}; PyTorch peer on {peer or 'none'}", file=sys.stderr)
    rate = {dtype: matmul_gflops(sizes["matmul"], dtype=dtype)
            for dtype in ("float32", "bfloat16")}
    nominal = nominal_bf16_tflops(device.device_kind) if backend != "cpu" else None
    rows = [*extract_rows(sizes["extract"], peer, repetitions),
            *train_rows(sizes["train"], sizes["train_steps"], peer, repetitions),
            *decode_rows(sizes["decode"], peer, repetitions)]
    rows = [finish(row, rate, nominal) for row in rows]
    print(table(rows), file=sys.stderr)
    print(f"matmul rate measured here: float32 {rate['float32']:.0f} GFLOP/s, bfloat16 "
          f"{rate['bfloat16']:.0f} GFLOP/s; nominal bfloat16 peak "
          f"{f'{nominal:g} TFLOP/s' if nominal else 'not known for this device'}",
          file=sys.stderr)
    torch_version = None
    if peer:
        import torch
        torch_version = torch.__version__
    print(json.dumps(dict(
        backend=backend, device_kind=device.device_kind, device_count=jax.device_count(),
        torch_device=peer, matmul_gflops={k: round(v, 1) for k, v in rate.items()},
        nominal_bf16_tflops=nominal, rows=rows, repetitions=repetitions,
        seconds=round(time.perf_counter() - started, 1), jax=jax.__version__,
        torch=torch_version, **info)))


if __name__ == "__main__":
    main()
