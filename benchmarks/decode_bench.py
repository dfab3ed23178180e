"""Beam-search captions/s of jaxcap against the PyTorch tutorial's per-image beam search.

Workload: beam 5, 64 images' cached 7x7x2048 features, the training
benchmark's decoder (vocabulary 3000, embedding 50, hidden and attention 512),
at most 22 tokens. jaxcap runs ``CaptionSearch`` (all 64 images and their
beams in one jitted ``while_loop``); PyTorch runs, image by image, the beam
search of the best-known Show-Attend-Tell tutorial (``caption_image_beam_search``:
the feature grid copied per beam, the encoder projection recomputed at every
step, finished beams removed) with the same weights. Randomly initialised
weights almost never choose ``<end>``, so both searches run all 21 steps:
the same work on both sides. (The tutorial's code raises when no beam ends;
the peer here returns the best unfinished beam, as jaxcap does.) Both mask
``<pad>`` and ``<start>``, so that they search the same space, and the
benchmark reports how many of the 64 captions agree.

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

from benchmarks.common import best_seconds, machine, matmul_gflops  # noqa: E402
from benchmarks.train_bench import decoder_macs  # noqa: E402
from jaxcap import configs  # noqa: E402
from jaxcap.data.text import END_ID, PAD_ID, START_ID, Vocabulary  # noqa: E402
from jaxcap.decode import CaptionSearch, SearchOptions  # noqa: E402
from jaxcap.train import make_model  # noqa: E402

BEAM, VOCAB, MAX_LENGTH, GRID, FEATURES = 5, 3000, 22, 7, 2048
EMBED, HIDDEN, ATTENTION = 50, 512, 512


def jaxcap_search(images: int):
    config = configs.load("flickr8k")
    model = make_model(config, VOCAB, dict(depth=50, preprocessing="torch"))
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
    """Matmul FLOPs of one image's beam search (per beam and step, plus once per image)."""
    once, per_step = decoder_macs(GRID * GRID, FEATURES, ATTENTION, HIDDEN, EMBED, VOCAB)
    return 2.0 * (once + steps * beam * per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--torch-repetitions", type=int, default=2)
    args = parser.parse_args()
    import torch

    info = machine()
    print(f"machine: {info}", file=sys.stderr)
    peak = matmul_gflops()
    search, params, features = jaxcap_search(args.images)
    result = {}

    def run_jaxcap():
        result["jaxcap"] = search(features)

    ours = args.images / best_seconds(run_jaxcap, args.repetitions)
    decoder = torch_decoder(params)
    torch_features = torch.from_numpy(features)

    def run_torch():
        with torch.no_grad():
            result["torch"] = [tutorial_beam_search(decoder, torch_features[i], BEAM, MAX_LENGTH)
                               for i in range(args.images)]

    theirs = args.images / best_seconds(run_torch, args.torch_repetitions, warmup=0)
    jaxcap_tokens = [[int(t) for t in row if t != PAD_ID] for row in result["jaxcap"].tokens]
    same = sum(a == b for a, b in zip(jaxcap_tokens, result["torch"]))
    steps = float(np.mean([len(row) - 1 for row in jaxcap_tokens]))
    flops = beam_flops_per_caption(int(round(steps)))
    figures = dict(
        jaxcap_captions_per_s=round(ours, 1), torch_captions_per_s=round(theirs, 2),
        ratio_vs_torch=round(ours / theirs, 1), same_captions=f"{same}/{args.images}",
        decoder_steps_per_caption=round(steps, 1), matmul_gflops=round(peak, 1),
        gflops_per_caption=round(flops / 1e9, 2),
        share_of_matmul_peak=round(ours * flops / (peak * 1e9), 3),
        beam=BEAM, images=args.images, vocab=VOCAB, max_length=MAX_LENGTH,
        jax=jax.__version__, torch=torch.__version__, **info)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
