"""Beam-search captions/s of jaxcap (batch and continuous) against PyTorch's per-image
(tutorial) and batched searches, on captions whose lengths vary as Flickr8k's do.

Workload: beam 5, 512 images' 7x7x2048 feature grids, the training benchmark's
decoder (vocabulary 3000, embedding 50, hidden and attention 512), at most 22
tokens (the ``flickr8k`` config's), randomly initialised but for one LSTM unit
wired as a step counter (its gates read only their biases, so its cell grows by
a fixed amount every step from a start ``init_c`` gives each image) that alone
drives the ``<end>`` logit: each image's captions end after a number of words
set by its features, about normally distributed with Flickr8k's mean of 12 and
standard deviation of 4 (the ``<end>`` bias is calibrated to the mean; the
histogram is printed). Every other word is the random model's.

Contenders, all with the same weights and rules (summed log-probability,
``<pad>`` and ``<start>`` masked, finished beams carried at no cost):

* ``continuous``: jaxcap's ``ContinuousSearch``, 64 slots: an image leaves its
  slot when settled and the next one enters (``jaxcap caption`` and ``evaluate``).
* ``jaxcap``: ``CaptionSearch`` in batches of 64, each running until its last
  image settles.
* ``batched``: PyTorch, the search a user would write (``torch_peers.batched_beam_search``:
  all beams of a batch in one step, the projection hoisted), in batches of 64,
  each running until every beam of the batch has ended.
* ``tutorial``: the best-known Show-Attend-Tell tutorial's ``caption_image_beam_search``,
  image by image (the feature grid copied per beam, the encoder projection
  recomputed at every step, finished beams removed), timed on the first
  ``--tutorial-images`` images: it is the slowest by far. (The tutorial's code
  raises when no beam ends; the peer here returns the best unfinished beam, as
  jaxcap does.)

The batch searches run every image of a batch until its longest caption ends;
the continuous one spends a step only on captions that can still change, which
is where its lead over ``batched`` comes from beyond the per-step speed. The
captions are compared: the continuous search's to the batch search's (they must
be equal) and to the PyTorch peers'.

``--bfloat16`` adds the opt-in precision: jaxcap's continuous search with ``dtype=bfloat16``
(products on bfloat16 operands accumulating in float32) against the batched
PyTorch search under ``torch.autocast(dtype=bfloat16)``, with how many captions
each shares with its float32 self (random weights make near-ties common, so this
counts rounding, not quality; quality is measured on trained runs). Off by default:
on a CPU without AVX-512 BF16 or AMX, PyTorch's bfloat16 search takes minutes here.
Contenders are timed in turn, repetition by repetition
(``common.best_seconds_alternating``).

    python benchmarks/decode_bench.py [--images 512] [--batch 64] [--repetitions 3] [--bfloat16]

The last line printed is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import best_seconds_alternating, machine, machine_line, matmul_gflops  # noqa: E402
from benchmarks.torch_peers import batched_beam_search  # noqa: E402
from benchmarks.train_bench import decoder_macs  # noqa: E402
from jaxcap import configs  # noqa: E402
from jaxcap.data.text import END_ID, PAD_ID, START_ID, Vocabulary  # noqa: E402
from jaxcap.continuous import ContinuousSearch  # noqa: E402
from jaxcap.decode import CaptionSearch, SearchOptions  # noqa: E402
from jaxcap.models.captioner import build_captioner  # noqa: E402

BEAM, VOCAB, MAX_LENGTH, GRID, FEATURES = 5, 3000, 22, 7, 2048
EMBED, HIDDEN, ATTENTION = 50, 512, 512


MEAN_WORDS, SD_WORDS = 12.0, 4.0  # Flickr8k's captions
COUNTER, COUNT_STEP, END_SLOPE = 0, 0.05, 60.0  # the counting unit, its growth a step, <end>'s gain
SEARCH = SearchOptions(beam_size=BEAM, max_length=MAX_LENGTH, min_length=0)


def vocabulary() -> Vocabulary:
    return Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)])


def grids(images: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((images, GRID, GRID, FEATURES), np.float32)


def model_of(dtype: str = "float32"):
    config = configs.load("flickr8k")
    config.dtype = dtype
    return build_captioner(config, VOCAB, dict(depth=50, preprocessing="torch"))


def counting(params, end_bias: float):
    """``params`` (the soft decoder's) with unit ``COUNTER`` of the LSTM counting steps
    and driving ``<end>``: its gates read their biases only (input, forget and output
    gates open, the candidate ``COUNT_STEP``), so its cell grows by ``COUNT_STEP`` a step
    from where ``init_c`` starts it, about ``-COUNT_STEP * N(MEAN_WORDS, SD_WORDS)`` for
    the benchmark's grids: ``<end>``'s logit, ``END_SLOPE`` times the unit's output plus
    ``end_bias``, rises past the other words' near the step where the cell crosses 0."""
    p = jax.tree.map(np.array, params)
    h, j = HIDDEN, COUNTER
    gates = [j, h + j, 2 * h + j, 3 * h + j]  # i, f, g, o
    p["word_gates"]["kernel"][:, gates] = 0
    p["word_gates"]["bias"][gates] = [12.0, 12.0, np.arctanh(COUNT_STEP), 12.0]
    p["context_gates"]["kernel"][:, gates] = 0
    recurrent = [ATTENTION + FEATURES + g for g in gates]
    p["h_projection"]["kernel"][:, recurrent] = 0
    p["h_projection"]["bias"][recurrent] = 0
    # The mean of a grid's 49 standard normal regions has a standard deviation of 1/7 in
    # each of its FEATURES channels.
    spread = COUNT_STEP * SD_WORDS / np.sqrt(FEATURES / (GRID * GRID))
    p["init_c"]["kernel"][:, j] = np.random.default_rng(1).standard_normal(FEATURES) * spread
    p["init_c"]["bias"][j] = -COUNT_STEP * MEAN_WORDS
    p["output"]["kernel"][j, :] = 0
    p["output"]["kernel"][:, END_ID] = 0
    p["output"]["kernel"][j, END_ID] = END_SLOPE
    p["output"]["bias"][END_ID] = end_bias
    return p


def words(tokens) -> np.ndarray:
    """Each caption's words (``<start>``, ``<end>`` and ``<pad>`` not counted)."""
    return np.sum(np.asarray(tokens) > END_ID, axis=1)


def calibrated_variables(model, variables, features, steps: int = 12):
    """The counting variables whose ``<end>`` bias gives a mean of ``MEAN_WORDS`` words over
    ``features`` (bisection; the mean falls as the bias rises)."""
    low, high = -40.0, 40.0
    for _ in range(steps):
        middle = (low + high) / 2
        trial = {**variables, "params": {**variables["params"], "decoder": counting(
            variables["params"]["decoder"], middle)}}
        found = CaptionSearch(model, trial, vocabulary(), SEARCH, max_batch=len(features))
        low, high = ((middle, high) if words(found(features).tokens).mean() > MEAN_WORDS
                     else (low, middle))
    return trial


def jaxcap_variables(images: int):
    """The model's float32 variables, calibrated on the first 64 of ``images`` grids, and
    the grids."""
    model, features = model_of(), grids(images)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), features[:1],
                                    np.zeros((1, 3), np.int32))
    return calibrated_variables(model, variables, features[:64]), features


def jaxcap_search(images: int, dtype: str = "float32", batch: int | None = None,
                  continuous: bool = False, variables=None):
    """``(search, the decoder's params, features)``: ``CaptionSearch`` (``max_batch``
    ``batch``, default all the images), or ``ContinuousSearch`` with ``batch`` slots."""
    if variables is None:
        variables, features = jaxcap_variables(images)
    else:
        features = grids(images)
    model, batch = model_of(dtype), batch or images
    search = (ContinuousSearch(model, variables, vocabulary(), SEARCH, slots=batch)
              if continuous else
              CaptionSearch(model, variables, vocabulary(), SEARCH, max_batch=batch))
    return search, variables["params"]["decoder"], features


def torch_decoder(params):
    """The tutorial's decoder modules holding jaxcap's weights (Flax kernels are (in, out))."""
    import torch

    from benchmarks.torch_peers import TutorialDecoder

    decoder = TutorialDecoder(VOCAB, FEATURES, EMBED, HIDDEN, ATTENTION).eval()
    p = jax.tree.map(lambda x: torch.from_numpy(np.array(x)), params)
    fused_w, fused_b = p["h_projection"]["kernel"], p["h_projection"]["bias"]
    a, d = ATTENTION, FEATURES

    def dense(module, kernel, bias):
        module.weight.copy_(kernel.T)
        module.bias.copy_(bias)

    with torch.no_grad():
        encoder = p["attention"]["encoder"]
        dense(decoder.encoder_att, encoder["kernel"], encoder["bias"])
        decoder.full_att.weight.copy_(p["attention"]["score"]["kernel"].T)
        decoder.full_att.bias.zero_()
        dense(decoder.decoder_att, fused_w[:, :a], fused_b[:a])
        dense(decoder.f_beta, fused_w[:, a:a + d], fused_b[a:a + d])
        decoder.lstm.weight_hh.copy_(fused_w[:, a + d:].T)
        decoder.lstm.bias_hh.copy_(fused_b[a + d:])
        decoder.lstm.weight_ih.copy_(torch.cat([p["word_gates"]["kernel"],
                                                p["context_gates"]["kernel"]]).T)
        decoder.lstm.bias_ih.copy_(p["word_gates"]["bias"])
        decoder.embedding.weight.copy_(p["embed"]["embedding"])
        dense(decoder.init_h, p["init_h"]["kernel"], p["init_h"]["bias"])
        dense(decoder.init_c, p["init_c"]["kernel"], p["init_c"]["bias"])
        dense(decoder.fc, p["output"]["kernel"], p["output"]["bias"])
    return decoder


def tutorial_beam_search(decoder, features, k: int, max_length: int) -> list[int]:
    """One image, the tutorial's way (caption_image_beam_search, eval.py)."""
    import torch

    vocab = decoder.fc.out_features
    encoder_out = features.reshape(1, -1, features.shape[-1]).expand(k, -1, -1)
    k_prev_words = torch.full((k, 1), START_ID, dtype=torch.long)
    seqs, top_k_scores = k_prev_words, torch.zeros(k, 1)
    complete_seqs, complete_scores = [], []
    mean = encoder_out.mean(dim=1)
    h, c = decoder.init_h(mean), decoder.init_c(mean)
    step = 1
    while True:
        embeddings = decoder.embedding(k_prev_words).squeeze(1)
        att = decoder.full_att(torch.relu(decoder.encoder_att(encoder_out) +
                                          decoder.decoder_att(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(att, dim=1)
        context = torch.sigmoid(decoder.f_beta(h)) * (encoder_out * alpha.unsqueeze(2)).sum(dim=1)
        h, c = decoder.lstm(torch.cat([embeddings, context], dim=1), (h, c))
        scores = decoder.fc(h)
        scores[:, PAD_ID] = scores[:, START_ID] = -float("inf")
        scores = top_k_scores.expand_as(scores) + torch.log_softmax(scores, dim=1)
        flat = scores[0] if step == 1 else scores.view(-1)
        top_k_scores, top_k_words = flat.topk(k)
        previous, following = top_k_words // vocab, top_k_words % vocab
        seqs = torch.cat([seqs[previous], following.unsqueeze(1)], dim=1)
        incomplete = [i for i, word in enumerate(following.tolist()) if word != END_ID]
        complete = [i for i in range(len(following)) if i not in incomplete]
        complete_seqs += seqs[complete].tolist()
        complete_scores += top_k_scores[complete].tolist()
        k -= len(complete)
        if k == 0 or step == max_length - 1:
            break
        seqs, h, c = seqs[incomplete], h[previous[incomplete]], c[previous[incomplete]]
        encoder_out = encoder_out[previous[incomplete]]
        top_k_scores = top_k_scores[incomplete].unsqueeze(1)
        k_prev_words = following[incomplete].unsqueeze(1)
        step += 1
    if complete_seqs:
        return complete_seqs[int(np.argmax(complete_scores))]
    return seqs[int(top_k_scores.argmax())].tolist()  # the tutorial raises here


def beam_flops_per_caption(steps: int = MAX_LENGTH - 1, beam: int = BEAM) -> float:
    """Matmul FLOPs of one image's beam search as jaxcap runs it: once per image, the
    first step once, every later step once per beam."""
    once, per_step = decoder_macs(GRID * GRID, FEATURES, ATTENTION, HIDDEN, EMBED, VOCAB)
    return 2.0 * (once + (1 + (steps - 1) * beam) * per_step)


def histogram(counts: np.ndarray) -> str:
    """The captions' word counts, one line a count."""
    values, frequency = np.unique(counts, return_counts=True)
    scale = 60 / frequency.max()
    return "\n".join(f"{v:3d} words {n:4d} {'#' * max(1, round(n * scale))}"
                     for v, n in zip(values, frequency))


def _same(a, b) -> int:
    """How many rows of two token arrays hold the same caption (``<pad>`` ignored)."""
    strip = lambda row: [int(t) for t in row if t != PAD_ID]  # noqa: E731
    return sum(strip(x) == strip(y) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64,
                        help="images a batch (jaxcap's and PyTorch's), and the slots")
    parser.add_argument("--tutorial-images", type=int, default=32)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--bfloat16", action="store_true",
                        help="also time both searches in bfloat16")
    args = parser.parse_args()
    import torch

    info = machine()
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    peak = matmul_gflops()
    variables, features = jaxcap_variables(args.images)
    searches = {name: jaxcap_search(args.images, dtype, args.batch, continuous, variables)[0]
                for name, dtype, continuous in (("continuous", "float32", True),
                                                ("jaxcap", "float32", False),
                                                ("continuous_bf16", "bfloat16", True))
                if args.bfloat16 or dtype == "float32"}
    decoder = torch_decoder(variables["params"]["decoder"])
    torch_features = torch.from_numpy(features)
    result = {}

    def jaxcap_run(name):
        def run():
            result[name] = searches[name](features).tokens
        return run

    def batched_run(name, bf16: bool):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                result[name] = torch.cat([batched_beam_search(
                    decoder, torch_features[i:i + args.batch], BEAM, MAX_LENGTH,
                    (PAD_ID, START_ID), START_ID, END_ID, PAD_ID)
                    for i in range(0, args.images, args.batch)]).numpy()
        return run

    def run_tutorial():
        with torch.no_grad():
            result["tutorial"] = [tutorial_beam_search(decoder, torch_features[i], BEAM,
                                                       MAX_LENGTH)
                                  for i in range(args.tutorial_images)]

    runs = {"continuous": jaxcap_run("continuous"), "jaxcap": jaxcap_run("jaxcap"),
            "batched": batched_run("batched", False), "tutorial": run_tutorial}
    if args.bfloat16:
        runs.update(continuous_bf16=jaxcap_run("continuous_bf16"),
                    batched_bf16=batched_run("batched_bf16", True))
    seconds = best_seconds_alternating(runs, args.repetitions)
    rate = {name: (args.tutorial_images if name == "tutorial" else args.images) / value
            for name, value in seconds.items()}
    counts = words(result["continuous"])
    print(f"caption lengths (continuous search, {args.images} images):\n{histogram(counts)}",
          file=sys.stderr)
    tutorial_tokens = np.full((args.tutorial_images, MAX_LENGTH), PAD_ID)
    for row, caption in enumerate(result["tutorial"]):
        tutorial_tokens[row, :len(caption)] = caption
    steps = float(np.mean(counts)) + 1  # words and <end>
    flops = beam_flops_per_caption(int(round(steps)))
    n = args.images
    figures = dict(
        continuous_captions_per_s=round(rate["continuous"], 1),
        jaxcap_captions_per_s=round(rate["jaxcap"], 1),
        torch_batched_captions_per_s=round(rate["batched"], 1),
        torch_captions_per_s=round(rate["tutorial"], 2),
        ratio_vs_torch_batched=round(rate["continuous"] / rate["batched"], 2),
        batch_search_ratio_vs_torch_batched=round(rate["jaxcap"] / rate["batched"], 2),
        continuous_over_batch_search=round(rate["continuous"] / rate["jaxcap"], 2),
        ratio_vs_torch=round(rate["continuous"] / rate["tutorial"], 1),
        same_captions_as_batch_search=f"{_same(result['continuous'], result['jaxcap'])}/{n}",
        same_captions_batched=f"{_same(result['continuous'], result['batched'])}/{n}",
        same_captions=(f"{_same(result['continuous'][:args.tutorial_images], tutorial_tokens)}"
                       f"/{args.tutorial_images}"),
        words_mean=round(float(np.mean(counts)), 2), words_sd=round(float(np.std(counts)), 2),
        matmul_gflops=round(peak, 1), gflops_per_caption=round(flops / 1e9, 2),
        share_of_matmul_peak=round(rate["continuous"] * flops / (peak * 1e9), 3),
        beam=BEAM, images=n, batch=args.batch, tutorial_images=args.tutorial_images,
        vocab=VOCAB, max_length=MAX_LENGTH, jax=jax.__version__, torch=torch.__version__,
        **info)
    if args.bfloat16:
        figures.update(
            continuous_bf16_captions_per_s=round(rate["continuous_bf16"], 1),
            torch_batched_bf16_captions_per_s=round(rate["batched_bf16"], 1),
            bf16_ratio_vs_torch_batched_bf16=round(rate["continuous_bf16"] /
                                                   rate["batched_bf16"], 2),
            bf16_same_captions_as_f32=(f"{_same(result['continuous_bf16'], result['continuous'])}"
                                       f"/{n}"),
            torch_bf16_same_captions_as_f32=(f"{_same(result['batched_bf16'], result['batched'])}"
                                             f"/{n}"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
