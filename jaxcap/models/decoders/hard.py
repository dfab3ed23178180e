"""``hard``: Show, Attend and Tell's stochastic hard attention.

The decoder is ``soft``'s, except for what a step sees of the image: in
training one region ``s ~ Categorical(alpha)`` is sampled, and with
probability ``expected_context_prob`` (the paper's 0.5) the expected context
of soft attention is used instead; in decoding the most likely region.

Under self-critical training the regions are part of the policy (``CHOOSES``):
each rollout samples its region at every step with its words, and the
teacher-forced replay of that rollout adds ``log alpha_t(s_t)`` to the words'
log-probabilities, so REINFORCE moves the attention too. (Scored on the most
likely region, the one-hot would carry no gradient into the attention.)

Training follows the paper's variational objective. The cross-entropy of the
caption given the sampled regions is the trainer's; this variant adds

* REINFORCE, ``-(log p(y | s) - b) * sum_t log p(s_t)`` with ``b`` a moving
  average of ``log p(y | s)`` (kept in the ``batch_stats`` collection, bias
  corrected like Adam's moments, averaged over devices by the trainer);
* an entropy bonus, ``-entropy_weight * H(alpha_t)``;

both per token, like the cross-entropy, so that the sum's gradient is an
unbiased estimate of the gradient of the expected cross-entropy (tested by
enumerating every region choice of a small case). Steps that used the
expected context have no sampled region and add no REINFORCE term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcap.models import precision
from jaxcap.models.decoders.base import AT_LEAST_0, FRACTION, PROBABILITY, Decoder
from jaxcap.models.decoders.soft import SoftAttentionDecoder


class HardAttentionDecoder(SoftAttentionDecoder):
    alpha_c: float = 0.0  # the paper's hard attention has no doubly stochastic penalty
    reinforce_weight: float = 1.0
    entropy_weight: float = 0.01
    baseline_decay: float = 0.9
    expected_context_prob: float = 0.5

    # A decay of 1 would never move the baseline from its start (it accumulates no weight).
    RULES = {**SoftAttentionDecoder.RULES, "reinforce_weight": AT_LEAST_0,
             "entropy_weight": AT_LEAST_0, "baseline_decay": FRACTION,
             "expected_context_prob": PROBABILITY}
    CHOOSES = True  # the region each step looks at

    def setup(self):
        super().setup()
        # (moving average of log p(y | s), the weight it has accumulated)
        self.baseline = self.variable("batch_stats", "reward_baseline",
                                      lambda: jnp.zeros(2, jnp.float32))

    def teacher_forced(self, context, state, tokens, train: bool, choices=None) -> dict:
        # The generic path always: soft's hand-written backward assumes the expected context.
        return Decoder.teacher_forced(self, context, state, tokens, train, choices)

    def step(self, context, state, word, train: bool, choice=None):
        regions, projected = context
        state, out, _ = self.gated_step(state, self.word_gates(word), projected, regions, train,
                                        choice=choice)
        return state, out

    def glimpse(self, alpha, regions, train: bool, choice=None):
        log_alpha = jnp.log(jnp.maximum(alpha, jnp.finfo(jnp.float32).tiny))
        if not train:
            if choice is None and not self.has_rng("sample"):  # a search: the likeliest region
                choice = jnp.argmax(alpha, axis=-1)
                return precision.einsum("bp,bpd->bd", jax.nn.one_hot(
                    choice, alpha.shape[-1], dtype=regions.dtype), regions), {}
            if choice is None:  # a rollout of the policy (SCST): the region is drawn
                choice = jax.random.categorical(self.make_rng("sample"),
                                                jax.lax.stop_gradient(log_alpha))
            chosen = jax.nn.one_hot(choice, alpha.shape[-1], dtype=regions.dtype)
            return precision.einsum("bp,bpd->bd", chosen, regions), {
                "choice": choice.astype(jnp.int32),
                "choice_logp": jnp.take_along_axis(log_alpha, choice[:, None], axis=1)[:, 0]}
        region_key, expected_key = jax.random.split(self.make_rng("sample"))
        choice = jax.random.categorical(region_key, jax.lax.stop_gradient(log_alpha))
        expected = jax.random.bernoulli(expected_key, self.expected_context_prob,
                                        choice.shape)
        # A sampled one-hot carries no gradient into alpha: REINFORCE does that.
        chosen = jax.nn.one_hot(choice, alpha.shape[-1], dtype=alpha.dtype)
        weights = jnp.where(expected[:, None], alpha, chosen)
        region_logp = jnp.where(expected, 0.0,
                                jnp.take_along_axis(log_alpha, choice[:, None], axis=1)[:, 0])
        entropy = -jnp.sum(alpha * log_alpha, axis=-1)
        context = precision.einsum("bp,bpd->bd", weights.astype(regions.dtype), regions)
        return context, {"region_logp": region_logp, "entropy": entropy}

    def losses(self, outputs, token_logp, mask, weights, train: bool) -> dict:
        if not train:
            return {}
        caption_logp = jnp.sum(token_logp, axis=1)  # (B,): log p(y | s)
        average, accumulated = self.baseline.value
        baseline = jnp.where(accumulated > 0, average / jnp.maximum(accumulated, 1e-12), 0.0)
        if self.is_mutable_collection("batch_stats"):
            mean = jnp.sum(weights * caption_logp) / jnp.maximum(jnp.sum(weights), 1.0)
            decay = self.baseline_decay
            self.baseline.value = jnp.stack([decay * average + (1 - decay) * mean,
                                             decay * accumulated + (1 - decay)])
        advantage = jax.lax.stop_gradient(caption_logp - baseline)
        sampled_logp = jnp.sum(mask * outputs["region_logp"], axis=1)
        reinforce = -self.reinforce_weight * jnp.sum(advantage * sampled_logp)
        entropy = -self.entropy_weight * jnp.sum(mask * outputs["entropy"])
        return {"reinforce": (reinforce, "token"), "entropy": (entropy, "token")}
