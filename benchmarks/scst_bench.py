"""Self-critical training: the share of its step spent on the reward, against pycocoevalcap.

Workload: the ``shapes`` default (its ResNet-18 in the graph, 64-pixel images,
batch 32) with ``scst.samples`` 5 and the greedy baseline: per step 160 sampled
and 32 greedy captions are decoded and scored by CIDEr-D against the training
references (document frequencies of the 6,000 training images). Timed, best
of several repetitions in one process:

* ``scst_step_ms``: jaxcap's whole pmapped SCST step (encoder, sampling, greedy
  decoding, rewards, the teacher-forced pass and its backward, Adam);
* ``reward_ms``: the jitted rewards alone, on the same number of captions (the
  batch's training captions as hypotheses), and their share of the step;
* ``pycocoevalcap_reward_ms``: pycocoevalcap's CIDEr-D (Python) on the same
  captions and references, what a PyTorch SCST loop computes on the host at every step;
* ``cross_entropy_step_ms``: the cross-entropy step of the same model and batch.

    python benchmarks/scst_bench.py --init-from runs/shapes [--repetitions 5]

The model is that run's best checkpoint (the README's main job): a trained model's
captions end where a random one's run to the maximum length. The last line printed is one JSON object of the figures.
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

from benchmarks.common import best_seconds, machine, machine_line  # noqa: E402
from jaxcap import configs, scst  # noqa: E402
from jaxcap.data.prepare import pipeline_options, prepare_dataset  # noqa: E402
from jaxcap.train import state as train_state, steps  # noqa: E402
from jaxcap.data.pipeline import Batcher, SplitIndex  # noqa: E402
from jaxcap.data.text import words as words_of  # noqa: E402
from jaxcap.runs import load_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init-from", required=True, help="a trained shapes run directory")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5)
    args = parser.parse_args()
    info = machine()

    run = load_run(args.init_from)
    config, vocabulary, model, variables = run.config, run.vocabulary, run.model, run.variables
    defaults = configs.load("shapes")
    config.objective, config.scst = "scst", defaults.scst  # runs before SCST lack the section
    config.scst.samples = args.samples
    built = prepare_dataset(config)
    index = SplitIndex(built.as_data_source("train"))
    objective = scst.Objective.from_config(config)
    references = scst.training_references(index.captions, vocabulary)
    options, _ = pipeline_options(config)
    batch = next(iter(Batcher(built.as_data_source("train"), vocabulary, options, None,
                              index).epoch(0)))

    tx = train_state.make_optimizer(config, train_state.learning_rate_schedule(config, 100))
    size = config.encoder.image_size
    encoder_variables = {collection: tree["encoder"] for collection, tree in variables.items()}
    state = train_state.init_state(model, config, (size, size, 3), np.zeros(
        (len(vocabulary), config.decoder.embed_dim), np.float32), encoder_variables, tx)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=tx.init(variables["params"]))
    replicated_state = steps.replicate(state)
    sharded = steps.shard(batch, jax.local_device_count())
    rng = steps.replicate(jax.random.PRNGKey(0))
    replicated_refs = steps.replicate(references)

    def step_time(objective_or_none) -> float:
        step = jax.pmap(functools.partial(steps.train_step, model=model, tx=tx,
                                          objective=objective_or_none), axis_name="batch")

        def run():
            jax.block_until_ready(step(replicated_state, sharded, rng, replicated_refs))
        return best_seconds(run, args.repetitions)

    scst_seconds, ce_seconds = step_time(objective), step_time(None)

    # The rewards of one step: samples x batch sampled captions, batch greedy ones.
    image = np.asarray(batch["image_index"])
    captions = [index.captions[i][0] for i in image]
    word_ids = [[vocabulary.id(w) for w in words_of(c)] for c in captions]
    width = int(references.words.shape[-1])
    words = np.full((len(image), width), -1, np.int32)
    for row, ids in enumerate(word_ids):
        words[row, :len(ids)] = ids[:width]
    lengths = np.asarray([min(len(ids), width) for ids in word_ids], np.int32)
    sampled = (np.repeat(words, args.samples, 0), np.repeat(lengths, args.samples),
               np.repeat(image, args.samples))
    reward = jax.jit(objective.reward)
    device_refs = jax.device_put(references)

    def rewards_once():
        jax.block_until_ready((reward(sampled[0], sampled[1], device_refs, sampled[2]),
                               reward(words, lengths, device_refs, image)))
    reward_seconds = best_seconds(rewards_once, args.repetitions)

    from pycocoevalcap.cider.cider import Cider
    texts = [" ".join(vocabulary.tokens[w] for w in row[row >= 0]) for row in sampled[0]]
    gts = {k: [" ".join(words_of(c)) for c in index.captions[i]]
           for k, i in enumerate(list(sampled[2]) + list(image))}
    res = {k: [t] for k, t in enumerate(texts + captions)}
    peer_seconds = best_seconds(lambda: Cider().compute_score(gts, res), args.repetitions)

    figures = dict(
        machine=info, samples=args.samples, batch=int(len(image)),
        scst_step_ms=scst_seconds * 1e3, cross_entropy_step_ms=ce_seconds * 1e3,
        reward_ms=reward_seconds * 1e3, reward_share_of_step=reward_seconds / scst_seconds,
        pycocoevalcap_reward_ms=peer_seconds * 1e3,
        ratio_vs_pycocoevalcap=peer_seconds / reward_seconds)
    print(machine_line(info))
    print(f"SCST step {figures['scst_step_ms']:.1f} ms (cross-entropy step "
          f"{figures['cross_entropy_step_ms']:.1f} ms); rewards of its "
          f"{len(image) * (args.samples + 1)} captions {figures['reward_ms']:.2f} ms "
          f"({100 * figures['reward_share_of_step']:.1f}% of the step); pycocoevalcap's "
          f"CIDEr-D on them {figures['pycocoevalcap_reward_ms']:.1f} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
