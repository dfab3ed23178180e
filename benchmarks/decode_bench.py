"""Beam-search captions/s of jaxcap against PyTorch's per-image (tutorial) and batched searches.

Workload: beam 5, 64 images' cached 7x7x2048 features, the training
benchmark's decoder (vocabulary 3000, embedding 50, hidden and attention 512),
at most 22 tokens. jaxcap runs ``CaptionSearch`` (all 64 images and their
beams in one jitted ``while_loop``); PyTorch runs, image by image, the beam
search of the best-known Show-Attend-Tell tutorial (``caption_image_beam_search``:
the feature grid copied per beam, the encoder projection recomputed at every
step, finished beams removed) with the same weights. Randomly initialised
weights almost never choose ``<end>``, so both searches run all 21 steps:
the same work on both sides, but for jaxcap's first step, which runs once
per image rather than once per beam. (The tutorial's code raises when no beam ends;
the peer here returns the best unfinished beam, as jaxcap does.) The
tutorial's search recomputes the projection of a 5x49x2048 grid at every
step, about 6.7x jaxcap's arithmetic per image, so ``ratio_vs_torch`` mostly
measures that peer; ``ratio_vs_torch_batched`` is against the search a user
would pick instead (``torch_peers.batched_beam_search``: all images and beams
in one batch, the projection hoisted, the grid shared between an image's
beams, the same rules as jaxcap's). All three mask ``<pad>`` and ``<start>``,
so that they search the same space, and the benchmark reports how many of
the 64 captions agree. The three are timed in turn, repetition by
repetition (``common.best_seconds_alternating``).

The opt-in precision: jaxcap with ``dtype=bfloat16`` (products on bfloat16
operands accumulating in float32, parameters float32) against the batched
PyTorch search under ``torch.autocast(dtype=bfloat16)``, both reported
beside the float32 figures, with how many captions each shares with its
float32 self (random weights make near-ties common, so this counts
rounding, not quality; quality is measured on trained runs, see docs/variants.md).

    python benchmarks/decode_bench.py [--images 64] [--repetitions 3]

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
from jaxcap.decode import CaptionSearch, SearchOptions  # noqa: E402
from jaxcap.models.captioner import build_captioner  # noqa: E402

BEAM, VOCAB, MAX_LENGTH, GRID, FEATURES = 5, 3000, 22, 7, 2048
EMBED, HIDDEN, ATTENTION = 50, 512, 512


def jaxcap_search(images: int, dtype: str = "float32"):
    config = configs.load("flickr8k")
    config.dtype = dtype
    model = build_captioner(config, VOCAB, dict(depth=50, preprocessing="torch"))
    features = np.random.default_rng(0).standard_normal((images, GRID, GRID, FEATURES),
                                                         np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), features[:1],
                                    np.zeros((1, 3), np.int32))
    vocabulary = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] +
                            [f"w{i}" for i in range(VOCAB - 4)])
    search = CaptionSearch(model, variables, vocabulary,
                           SearchOptions(beam_size=BEAM, max_length=MAX_LENGTH, min_length=0),
                           max_batch=images)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    import torch

    info = machine()
    print(f"machine: {machine_line(info)}", file=sys.stderr)
    peak = matmul_gflops()
    search, params, features = jaxcap_search(args.images)
    search_bf16 = jaxcap_search(args.images, "bfloat16")[0]
    decoder = torch_decoder(params)
    torch_features = torch.from_numpy(features)
    result = {}

    def run_jaxcap():
        result["jaxcap"] = search(features)

    def run_jaxcap_bf16():
        result["jaxcap_bf16"] = search_bf16(features)

    def run_tutorial():
        with torch.no_grad():
            result["torch"] = [tutorial_beam_search(decoder, torch_features[i], BEAM, MAX_LENGTH)
                               for i in range(args.images)]

    def run_batched():
        with torch.no_grad():
            result["batched"] = batched_beam_search(decoder, torch_features, BEAM, MAX_LENGTH,
                                                    (PAD_ID, START_ID), START_ID, END_ID, PAD_ID)

    def run_batched_bf16():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            result["batched_bf16"] = batched_beam_search(
                decoder, torch_features, BEAM, MAX_LENGTH, (PAD_ID, START_ID), START_ID, END_ID,
                PAD_ID)

    seconds = best_seconds_alternating(
        {"jaxcap": run_jaxcap, "tutorial": run_tutorial, "batched": run_batched,
         "jaxcap_bf16": run_jaxcap_bf16, "batched_bf16": run_batched_bf16}, args.repetitions)
    ours, theirs, batched, ours_bf16, batched_bf16 = (
        args.images / seconds[name]
        for name in ("jaxcap", "tutorial", "batched", "jaxcap_bf16", "batched_bf16"))
    jaxcap_tokens = [[int(t) for t in row if t != PAD_ID] for row in result["jaxcap"].tokens]
    same = sum(a == b for a, b in zip(jaxcap_tokens, result["torch"]))
    batched_tokens = [[int(t) for t in row if t != PAD_ID] for row in result["batched"].tolist()]
    same_batched = sum(a == b for a, b in zip(jaxcap_tokens, batched_tokens))
    same_bf16 = sum(a == [int(t) for t in b if t != PAD_ID]
                    for a, b in zip(jaxcap_tokens, result["jaxcap_bf16"].tokens))
    same_torch_bf16 = sum(a == [int(t) for t in b if t != PAD_ID]
                          for a, b in zip(batched_tokens, result["batched_bf16"].tolist()))
    steps = float(np.mean([len(row) - 1 for row in jaxcap_tokens]))
    flops = beam_flops_per_caption(int(round(steps)))
    figures = dict(
        jaxcap_captions_per_s=round(ours, 1), torch_captions_per_s=round(theirs, 2),
        ratio_vs_torch=round(ours / theirs, 1), same_captions=f"{same}/{args.images}",
        torch_batched_captions_per_s=round(batched, 1),
        ratio_vs_torch_batched=round(ours / batched, 2),
        same_captions_batched=f"{same_batched}/{args.images}",
        jaxcap_bf16_captions_per_s=round(ours_bf16, 1),
        torch_batched_bf16_captions_per_s=round(batched_bf16, 1),
        bf16_ratio_vs_torch_batched_f32=round(ours_bf16 / batched, 2),
        bf16_ratio_vs_torch_batched_bf16=round(ours_bf16 / batched_bf16, 2),
        bf16_same_captions_as_f32=f"{same_bf16}/{args.images}",
        torch_bf16_same_captions_as_f32=f"{same_torch_bf16}/{args.images}",
        decoder_steps_per_caption=round(steps, 1), matmul_gflops=round(peak, 1),
        gflops_per_caption=round(flops / 1e9, 2),
        share_of_matmul_peak=round(ours * flops / (peak * 1e9), 3),
        beam=BEAM, images=args.images, vocab=VOCAB, max_length=MAX_LENGTH,
        jax=jax.__version__, torch=torch.__version__, **info)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
