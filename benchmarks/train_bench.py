"""Training captions/s (forward, backward, Adam) of jaxcap against PyTorch eager.

Both consume the same 10 x 32 captions: PyTorch batch by batch as they come,
shrinking each batch step by step as its captions end; jaxcap grouped by its
training pipeline's length bucketing, each batch padded to its longest caption
(rounded up to a multiple of 4). A second hoisted PyTorch run gets jaxcap's
length-sorted batches too (``torch_hoisted_bucketed``), so that the grouping
is not counted as jaxcap's.

Workload: cached 7x7x2048 features, batch 32, vocabulary 3000, embedding 50,
hidden and attention 512, captions of random lengths up to 22 tokens, dropout
0.5, the doubly stochastic penalty. jaxcap runs its real pmapped train step
(one CPU device here); PyTorch runs the same decoder eagerly, once the way the
best-known tutorial does (encoder projection recomputed at every step, batch
shrunk per step) and once with the projection hoisted. Same process, same
machine, best of several repetitions of several steps, the contenders' repetitions
taken in turn (``common.best_seconds_alternating``). jaxcap also runs the
same soft decoder through the generic path every variant trains on (its step
under ``nn.scan`` with plain autodiff, no hand-written backward), so that the
fast path's worth is measured: ``generic_soft_captions_per_s``. And it runs in
the opt-in bfloat16 precision (``jaxcap_bf16_captions_per_s``).

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

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import best_seconds_alternating, machine, machine_line, matmul_gflops  # noqa: E402
from jaxcap import configs  # noqa: E402
from jaxcap.data.pipeline import EpochExamples, PipelineOptions  # noqa: E402
from jaxcap.models.captioner import build_captioner  # noqa: E402
from jaxcap.train.state import init_state, learning_rate_schedule, make_optimizer  # noqa: E402
from jaxcap.train.steps import replicate, shard, train_step  # noqa: E402

BATCH, VOCAB, MAX_LENGTH, GRID, FEATURES = 32, 3000, 22, 7, 2048


def batches(count: int, seed: int = 0, batch: int = BATCH) -> list[dict]:
    """``count`` batches of captions in the order they come (what PyTorch consumes)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(8, MAX_LENGTH + 1, batch)  # <start> ... <end>
        tokens = rng.integers(4, VOCAB, (batch, MAX_LENGTH)).astype(np.int32)
        tokens[:, 0] = 1
        tokens[np.arange(batch), lengths - 1] = 2
        tokens[np.arange(MAX_LENGTH)[None, :] >= lengths[:, None]] = 0
        out.append({"features": rng.standard_normal((batch, GRID, GRID, FEATURES), np.float32),
                    "tokens": tokens, "weights": np.ones(batch, np.float32),
                    "lengths": lengths})
    return out


class _Pool:
    """The benchmark's captions seen as a split: one caption per 'image'."""

    def __init__(self, data: list[dict]):
        self.captions = [[None] for b in data for _ in b["lengths"]]

    def __len__(self) -> int:
        return len(self.captions)


def bucketed(data: list[dict]) -> list[dict]:
    """The same captions regrouped the way jaxcap's training pipeline groups them
    (``text.length_multiple`` of the flickr8k config: sorted within windows,
    each batch padded to its longest caption rounded up to a multiple of 4)."""
    config = configs.load("flickr8k")
    batch = len(data[0]["lengths"])
    options = PipelineOptions(batch_size=batch, max_length=MAX_LENGTH, shuffle=False,
                              drop_remainder=True, length_multiple=config.text.length_multiple,
                              bucket_window=config.text.bucket_window)
    flat = {k: np.concatenate([b[k] for b in data]) for k in data[0]}
    lengths = [[int(n)] for n in flat["lengths"]]
    entries = EpochExamples(_Pool(data), lengths, options, epoch=0).pairs
    out = []
    for start in range(0, len(entries), batch):
        group = entries[start:start + batch]
        rows = np.asarray([image for image, _, _ in group])
        width = group[0][2]
        out.append({"features": flat["features"][rows], "tokens": flat["tokens"][rows, :width],
                    "weights": flat["weights"][rows], "lengths": flat["lengths"][rows]})
    return out


def jaxcap_run(data: list[dict], fast_path: bool = True, dtype: str = "float32"):
    """jaxcap's pmapped train step on the bucketed batches; ``fast_path`` False trains the
    soft variant through the generic path (its step under ``nn.scan``, plain autodiff);
    ``dtype`` is the config's compute precision."""
    config = configs.load("flickr8k")
    config.text.max_length = MAX_LENGTH
    config.decoder.soft.fast_path = fast_path
    config.dtype = dtype
    model = build_captioner(config, VOCAB, dict(depth=50, preprocessing="torch"))
    tx = make_optimizer(config, learning_rate_schedule(config, 1000))
    embedding = np.random.default_rng(0).standard_normal((VOCAB, 50)).astype(np.float32)
    state = replicate(init_state(model, config, (GRID, GRID, FEATURES), embedding, None, tx))
    step = jax.pmap(functools.partial(train_step, model=model, tx=tx,
                                      label_smoothing=0.0),
                    axis_name="batch", donate_argnums=(0,))
    rng = replicate(jax.random.PRNGKey(0))
    sharded = [shard({k: v for k, v in b.items() if k != "lengths"}, jax.local_device_count())
               for b in bucketed(data)]
    holder = {"state": state}

    def run():
        for batch in sharded:
            holder["state"], metrics = step(holder["state"], batch, rng)
        jax.block_until_ready(metrics["loss"])

    run()  # compile every padded length before timing
    return run


def decoder_macs(regions: int = GRID * GRID, feature_dim: int = FEATURES,
                 attention_dim: int = 512, hidden_dim: int = 512, embed_dim: int = 50,
                 vocab: int = VOCAB) -> tuple[int, int]:
    """Multiply-adds of the decoder's forward: (once per image, per step of one caption)."""
    once = regions * feature_dim * attention_dim + 2 * feature_dim * hidden_dim
    per_step = (hidden_dim * (attention_dim + feature_dim + 4 * hidden_dim)  # fused h matmul
                + feature_dim * 4 * hidden_dim  # context share of the LSTM gates
                + embed_dim * 4 * hidden_dim  # word share (hoisted, but per step)
                + 2 * regions * attention_dim + regions * feature_dim  # scores, context
                + hidden_dim * vocab)  # output layer (hoisted, but per step)
    return once, per_step


def train_flops_per_caption(steps: float = MAX_LENGTH - 1) -> float:
    """Matmul FLOPs of one caption's forward and backward over all (padded) steps: the
    work done, not an upper bound.

    Counted by hand: XLA's cost analysis counts a loop body once, not once per
    step. A step's backward is twice its forward (input and weight gradients);
    the once-per-image products (region projection, initial state) read the
    cached features, constants, so their backward is the weight gradient alone.
    """
    once, per_step = decoder_macs()
    return 2 * (2 * once + 3 * steps * per_step)


def torch_run(data: list[dict], hoist: bool, device: str = "cpu"):
    import torch

    from benchmarks.torch_peers import TutorialDecoder, tutorial_loss

    torch.manual_seed(0)
    model = TutorialDecoder(VOCAB, hoist=hoist).train().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-4)
    tensors = [(torch.from_numpy(b["features"]).to(device),
                torch.from_numpy(b["tokens"]).long().to(device),
                torch.from_numpy(b["lengths"])) for b in data]

    def run():
        for features, tokens, lengths in tensors:
            scores, captions, decode_lengths, alphas = model(features, tokens, lengths)
            loss = tutorial_loss(scores, captions, decode_lengths, alphas)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    info = machine()
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    data = batches(args.steps)
    captions = args.steps * BATCH
    peak = matmul_gflops()
    seconds = best_seconds_alternating({
        "jaxcap": jaxcap_run(data),
        "generic": jaxcap_run(data, fast_path=False),
        "bfloat16": jaxcap_run(data, dtype="bfloat16"),
        "tutorial": torch_run(data, hoist=False),
        "hoisted": torch_run(data, hoist=True),
        "hoisted_bucketed": torch_run(bucketed(data), hoist=True),
    }, args.repetitions)
    ours, generic, bfloat16, tutorial, hoisted, hoisted_bucketed = (
        captions / seconds[name]
        for name in ("jaxcap", "generic", "bfloat16", "tutorial", "hoisted",
                     "hoisted_bucketed"))
    # The work jaxcap executes: each bucketed batch runs (its padded length - 1) steps.
    steps = float(np.mean([b["tokens"].shape[1] - 1 for b in bucketed(data)]))
    flops_per_caption = train_flops_per_caption(steps)
    figures = dict(
        jaxcap_captions_per_s=round(ours, 1),
        torch_tutorial_captions_per_s=round(tutorial, 1),
        torch_hoisted_captions_per_s=round(hoisted, 1),
        torch_hoisted_bucketed_captions_per_s=round(hoisted_bucketed, 1),
        ratio_vs_tutorial=round(ours / tutorial, 2),
        ratio_vs_hoisted=round(ours / hoisted, 2),
        ratio_vs_hoisted_bucketed=round(ours / hoisted_bucketed, 2),
        generic_soft_captions_per_s=round(generic, 1),
        generic_share_of_fast=round(generic / ours, 2),
        jaxcap_bf16_captions_per_s=round(bfloat16, 1),
        matmul_gflops=round(peak, 1),
        gflops_per_caption=round(flops_per_caption / 1e9, 3),
        decoder_steps_per_caption=round(steps, 2),
        share_of_matmul_peak=round(ours * flops_per_caption / (peak * 1e9), 3),
        batch_size=BATCH, vocab=VOCAB, max_length=MAX_LENGTH, steps=args.steps,
        jax=jax.__version__, torch=__import__("torch").__version__, **info)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
