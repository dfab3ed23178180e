"""Self-critical sequence training (Rennie et al. 2017).

``--config.objective=scst`` continues a cross-entropy run
(``--config.init_from=RUN_DIR``: its best checkpoint, its vocabulary and
encoder, its model settings); ``--config.scst.from_epoch=K`` switches a
cross-entropy run to it at epoch K. Either way the model trains at
``scst.learning_rate`` to maximise the expected reward of its own sampled
captions, by REINFORCE with a baseline:

    loss = -(1 / samples) * sum_s (r(w_s) - b) * log p(w_s)

* ``scst.samples`` captions per image are drawn inside the jitted step by the
  sampler every search uses (``jaxcap.decode.rollout``: temperature 1, no top-k,
  no minimum length, so ``p`` is the model's own distribution), from features
  the encoder computes once per image;
* ``r``: ``scst.cider_d`` x CIDEr-D + ``scst.bleu4`` x BLEU-4 (+
  ``scst.reward_fn_weight`` x a user's ``scst.reward_fn``, see
  ``jaxcap.rewards``) against the image's training references, document
  frequencies from the training split, ``<end>`` counted as a word of the
  samples and of the references (as Rennie et al. and self-critical.pytorch);
* ``b``: the reward of the greedy caption (``greedy``, Rennie et al.) or the
  mean reward of the image's other samples (``mean``);
* ``log p(w_s)`` comes from the teacher-forced pass over the sample, the one
  cross-entropy training differentiates, so every decoder variant trains this way.
  Both run in inference mode (no dropout, BatchNorm on its running statistics),
  so the samples come from exactly the distribution that is differentiated. A
  variant whose steps make a choice besides the word (``hard``: the region it
  looks at) is sampled with its choices, and the teacher-forced pass replays
  them: ``log p`` is then that of the words and the regions together.

Validation picks the best checkpoint by CIDEr-D.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp

from jaxcap import decode, rewards
from jaxcap.data.text import END_ID, PAD_ID, Vocabulary, words
from jaxcap.models.captioner import Captioner

BASELINES = ("greedy", "mean")


class InitError(ValueError):
    """``init_from`` does not name a run SCST can start from; the message says why."""


@dataclasses.dataclass(frozen=True)
class Objective:
    """What an SCST step needs besides the state and batch (static under jit)."""

    samples: int
    baseline: str
    max_length: int
    reward: Callable

    @classmethod
    def from_config(cls, config) -> "Objective":
        s = config.scst
        if s.baseline not in BASELINES:
            raise ValueError(f"scst.baseline must be one of {BASELINES}, got {s.baseline!r}")
        if s.samples < (2 if s.baseline == "mean" else 1):
            raise ValueError(f"scst.samples must be at least {2 if s.baseline == 'mean' else 1} "
                             f"with the {s.baseline} baseline, got {s.samples}")
        weights = {"cider_d": s.cider_d, "bleu4": s.bleu4}
        if s.reward_fn:
            weights[s.reward_fn] = s.reward_fn_weight
        return cls(samples=s.samples, baseline=s.baseline, max_length=config.eval.max_length,
                   reward=rewards.make_reward(weights))

    def terms(self, model: Captioner, variables, batch, rng, references: rewards.References):
        """``(terms, counts, None, stats)`` of this device's batch, as ``train.loss_terms``:
        the policy-gradient term (per sample), and as statistics the mean sample, baseline
        and greedy rewards and ``no_signal``, the share of images whose every sample scored
        its baseline (they give no gradient)."""
        inputs = batch["features"] if "features" in batch else batch["image"]
        image, weights = batch["image_index"], batch["weights"]
        features = model.apply(variables, inputs, method=Captioner.features)
        frozen = jax.lax.stop_gradient
        # The searches read the grid the encoder computed, with the decoder alone.
        searcher = Captioner(model.decoder)
        search_variables = frozen({collection: {"decoder": tree["decoder"]}
                                   for collection, tree in variables.items() if "decoder" in tree})
        batch_size, count = image.shape[0], self.samples
        repeated = jnp.repeat(frozen(features), count, axis=0)
        keys = jax.random.split(rng, batch_size * count)
        sampled, _, _, choices = decode.rollout(searcher, search_variables, repeated, keys,
                                                jax.random.fold_in(rng, 1), self.max_length)
        sample_words, sample_lengths = rewards.caption_words(sampled)
        reward = self.reward(sample_words, sample_lengths, references,
                             jnp.repeat(image, count)).reshape(batch_size, count)
        greedy_tokens, _, _ = decode.greedy(searcher, search_variables, frozen(features),
                                            self.max_length)
        greedy_reward = self.reward(*rewards.caption_words(greedy_tokens), references, image)
        if self.baseline == "greedy":
            baseline = jnp.broadcast_to(greedy_reward[:, None], reward.shape)
        else:
            baseline = (jnp.sum(reward, axis=1, keepdims=True) - reward) / (count - 1)
        advantage = frozen(reward - baseline) * weights[:, None]

        sample_logp = model.apply(variables, jnp.repeat(features, count, axis=0), sampled,
                                  choices, method=caption_log_probability).reshape(batch_size,
                                                                                   count)
        terms = {"scst": (-jnp.sum(advantage * sample_logp), "sample")}
        per_image = weights[:, None] * jnp.ones_like(reward)
        # An image whose samples all score their baseline gives no gradient: where every
        # image does (a policy settled on one caption, e.g. an empty one after too large
        # a step), SCST has stopped learning.
        no_signal = jnp.all(reward == baseline, axis=1).astype(jnp.float32)
        stats = {"reward": (jnp.sum(per_image * reward), "sample"),
                 "baseline_reward": (jnp.sum(per_image * baseline), "sample"),
                 "greedy_reward": (jnp.sum(weights * greedy_reward), "example"),
                 "no_signal": (jnp.sum(weights * no_signal), "example")}
        counts = {"sample": jnp.sum(per_image), "example": jnp.sum(weights)}
        return terms, counts, None, stats


def caption_log_probability(module: Captioner, features, tokens, choices=None):
    """The summed log-probability (N,) of decoded rows ``tokens`` (N, T) (``<start>`` first,
    ``<pad>`` after ``<end>``) under the model's next-word distribution, teacher-forced on
    the encoder's grids ``features`` in inference mode: what ``decode.rollout`` drew them
    from (its score), here differentiable. ``choices`` (N, T - 1): a variant's choices in
    that rollout, replayed, their log-probabilities added to the words'."""
    outputs = module.decoder(features, tokens[:, :-1], train=False, choices=choices)
    targets = tokens[:, 1:]
    token_logp = jnp.take_along_axis(decode.word_logp(outputs["logits"]), targets[..., None],
                                     axis=-1)[..., 0]
    if choices is not None:
        token_logp = token_logp + outputs["choice_logp"]
    return jnp.sum(jnp.where(targets != PAD_ID, token_logp, 0.0), axis=1)


def training_references(captions: list[list[str]], vocabulary: Vocabulary) -> rewards.References:
    """The reward's references: each training image's captions as word ids, whole (not cut
    to ``text.max_length``), in the vocabulary the model writes with, each closed by
    ``<end>`` as the samples are (``rewards.caption_words``)."""
    return rewards.References.build([[[vocabulary.id(w) for w in words(c)] + [END_ID]
                                      for c in image] for image in captions])


def check_init_run(init_from: str, workdir: Path) -> Path:
    """The absolute run directory ``init_from`` names, or an ``InitError`` saying what is wrong."""
    if not init_from:
        raise InitError("objective=scst continues a cross-entropy run: pass "
                        "--config.init_from=RUN_DIR (the --workdir of that run)")
    run = Path(init_from).expanduser().absolute()
    if run == workdir:
        raise InitError(f"init_from is the run's own --workdir ({run}): SCST writes a new run; "
                        "pass another --workdir")
    if not run.is_dir():
        raise InitError(f"init_from {run} does not exist")
    missing = [name for name in ("config.json", "vocabulary.json", "encoder")
               if not (run / name).exists()]
    if missing:
        raise InitError(f"init_from {run} is not a jaxcap run directory ({', '.join(missing)} "
                        "missing); pass the --workdir of a finished 'jaxcap train'")
    if not (run / "best").is_dir() or not any((run / "best").iterdir()):
        raise InitError(f"init_from {run} has no best checkpoint yet (it is written at the end "
                        "of the first epoch)")
    saved = json.loads((run / "config.json").read_text())
    if saved.get("objective", "cross_entropy") != "cross_entropy":
        raise InitError(f"init_from {run} is an {saved['objective']} run; start SCST from a "
                        "cross-entropy run")
    return run


def copy_run_files(run: Path, workdir: Path) -> None:
    """The vocabulary and encoder of the run SCST starts from, copied once."""
    if not (workdir / "vocabulary.json").exists():
        shutil.copy(run / "vocabulary.json", workdir / "vocabulary.json")
    if not (workdir / "encoder").exists():
        staging = workdir / ".encoder.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(run / "encoder", staging)
        staging.rename(workdir / "encoder")

