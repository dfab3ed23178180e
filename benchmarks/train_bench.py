"""Training captions/s (forward, backward, Adam) of jaxcap against PyTorch eager.

Workload: cached 7x7x2048 features, batch 32, vocabulary 3000, embedding 50,
hidden and attention 512, captions of random lengths up to 22 tokens, dropout
0.5, the doubly stochastic penalty. jaxcap runs its real pmapped train step
(one CPU device here); PyTorch runs the same decoder eagerly, once the way the
best-known tutorial does (encoder projection recomputed at every step, batch
shrunk per step) and once with the projection hoisted. Same process, same
machine, best of several repetitions of several steps.

    python benchmarks/train_bench.py [--steps 10] [--repetitions 3]

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.jax_utils  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import best_seconds, machine, matmul_gflops  # noqa: E402
from jaxcap import configs  # noqa: E402
from jaxcap.train import (init_state, learning_rate_schedule, make_model,  # noqa: E402
                          make_optimizer, train_step)

BATCH, VOCAB, MAX_LENGTH, GRID, FEATURES = 32, 3000, 22, 7, 2048


def batches(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(8, MAX_LENGTH + 1, BATCH)  # <start> ... <end>
        tokens = rng.integers(4, VOCAB, (BATCH, MAX_LENGTH)).astype(np.int32)
        tokens[:, 0] = 1
        tokens[np.arange(BATCH), lengths - 1] = 2
        tokens[np.arange(MAX_LENGTH)[None, :] >= lengths[:, None]] = 0
        out.append({"features": rng.standard_normal((BATCH, GRID, GRID, FEATURES), np.float32),
                    "tokens": tokens, "weights": np.ones(BATCH, np.float32),
                    "lengths": lengths})
    return out


def jaxcap_run(data: list[dict]):
    config = configs.load("flickr8k")
    config.text.max_length = MAX_LENGTH
    model = make_model(config, VOCAB, dict(depth=50, preprocessing="torch"))
    tx = make_optimizer(config, learning_rate_schedule(config, 1000))
    embedding = np.random.default_rng(0).standard_normal((VOCAB, 50)).astype(np.float32)
    state = flax.jax_utils.replicate(init_state(model, config, (GRID, GRID, FEATURES), embedding,
                                                None, tx))
    step = jax.pmap(functools.partial(train_step, model=model, tx=tx, alpha_c=1.0,
                                      label_smoothing=0.0),
                    axis_name="batch", donate_argnums=(0,))
    rng = flax.jax_utils.replicate(jax.random.PRNGKey(0))
    devices = jax.local_device_count()
    sharded = [jax.tree.map(lambda x: x.reshape(devices, -1, *x.shape[1:]),
                            {k: v for k, v in b.items() if k != "lengths"}) for b in data]
    holder = {"state": state}

    def run():
        for batch in sharded:
            holder["state"], metrics = step(holder["state"], batch, rng)
        jax.block_until_ready(metrics["loss"])

    return run


def train_flops() -> float:
    """FLOPs of one train step as XLA counts them (padded work included)."""
    config = configs.load("flickr8k")
    config.text.max_length = MAX_LENGTH
    model = make_model(config, VOCAB, dict(depth=50, preprocessing="torch"))
    tx = make_optimizer(config, learning_rate_schedule(config, 1000))
    embedding = np.zeros((VOCAB, 50), np.float32)
    state = init_state(model, config, (GRID, GRID, FEATURES), embedding, None, tx)
    batch = {k: v for k, v in batches(1)[0].items() if k != "lengths"}
    fn = jax.pmap(functools.partial(train_step, model=model, tx=tx, alpha_c=1.0,
                                    label_smoothing=0.0), axis_name="batch",
                  devices=jax.local_devices()[:1])
    lowered = fn.lower(flax.jax_utils.replicate(state, jax.local_devices()[:1]),
                       jax.tree.map(lambda x: x[None], batch),
                       flax.jax_utils.replicate(jax.random.PRNGKey(0), jax.local_devices()[:1]))
    return lowered.compile().cost_analysis()["flops"]


def torch_run(data: list[dict], hoist: bool):
    import torch

    from benchmarks.torch_peers import TutorialDecoder, tutorial_loss

    torch.manual_seed(0)
    model = TutorialDecoder(VOCAB, hoist=hoist).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4)
    tensors = [(torch.from_numpy(b["features"]), torch.from_numpy(b["tokens"]).long(),
                torch.from_numpy(b["lengths"])) for b in data]

    def run():
        for features, tokens, lengths in tensors:
            scores, captions, decode_lengths, alphas = model(features, tokens, lengths)
            loss = tutorial_loss(scores, captions, decode_lengths, alphas)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    data = batches(args.steps)
    captions = args.steps * BATCH
    peak = matmul_gflops()
    ours = captions / best_seconds(jaxcap_run(data), args.repetitions)
    tutorial = captions / best_seconds(torch_run(data, hoist=False), args.repetitions)
    hoisted = captions / best_seconds(torch_run(data, hoist=True), args.repetitions)
    flops_per_caption = train_flops() / BATCH
    figures = dict(
        jaxcap_captions_per_s=round(ours, 1),
        torch_tutorial_captions_per_s=round(tutorial, 1),
        torch_hoisted_captions_per_s=round(hoisted, 1),
        ratio_vs_tutorial=round(ours / tutorial, 2),
        ratio_vs_hoisted=round(ours / hoisted, 2),
        matmul_gflops=round(peak, 1),
        gflops_per_caption=round(flops_per_caption / 1e9, 3),
        share_of_matmul_peak=round(ours * flops_per_caption / (peak * 1e9), 3),
        batch_size=BATCH, vocab=VOCAB, max_length=MAX_LENGTH, steps=args.steps,
        jax=jax.__version__, torch=__import__("torch").__version__, **info)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
