"""``adaptive``: Knowing When to Look (Lu et al. 2017), adaptive attention with a visual sentinel.

Regions and their mean are projected to the LSTM's width with a ReLU
(``v_i``, ``v_g``); the LSTM reads the word and ``v_g`` at every step. After
the LSTM, attention runs with the *current* ``h_t`` over the regions and one
more candidate, the visual sentinel ``s_t = sigmoid(W_x x_t + W_h h_{t-1}) *
tanh(c_t)``, a summary of what the LSTM already knows. The sentinel's share
``beta_t`` is how much the word is taken from language rather than the image:
``c_hat = beta_t s_t + sum_i alpha_i v_i``, and the next word is read out of
``c_hat + h_t``.

The reported attention is the regions' part of the softmax, so it sums to
the visual share ``1 - beta_t`` (the sentinel share is what is missing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcap.models import precision
from jaxcap.models.decoders.base import AT_LEAST_1, Decoder, lstm_update, regions_of


class AdaptiveAttentionDecoder(Decoder):
    attention_dim: int = 512

    RULES = {**Decoder.RULES, "attention_dim": AT_LEAST_1}

    def setup(self):
        super().setup()
        self.region_projection = self.dense(self.hidden_dim)
        self.global_projection = self.dense(self.hidden_dim)
        # LSTM gates and the sentinel gate, from the input and from h_{t-1}.
        self.input_gates = self.dense(5 * self.hidden_dim)
        self.h_gates = self.dense(5 * self.hidden_dim, use_bias=False)
        self.region_keys = self.dense(self.attention_dim)
        self.sentinel_key = self.dense(self.attention_dim, use_bias=False)
        self.query = self.dense(self.attention_dim, use_bias=False)
        self.score = self.dense(1, use_bias=False)

    def start(self, features, max_length: int):
        regions = regions_of(features, self.dtype)
        visual = jax.nn.relu(self.region_projection(regions))  # v_i (B, P, H)
        global_feature = jax.nn.relu(self.global_projection(regions.mean(axis=1)))  # v_g
        zeros = jnp.zeros((regions.shape[0], self.hidden_dim), jnp.float32)
        return (visual, self.region_keys(visual), global_feature), (zeros.astype(self.dtype), zeros)

    def step(self, context, state, word, train: bool):
        visual, keys, global_feature = context
        h_prev, c_prev = state
        gates = self.input_gates(jnp.concatenate([word.astype(self.dtype), global_feature], -1))
        gates = gates + self.h_gates(h_prev)
        lstm_gates, sentinel_gate = gates[:, :4 * self.hidden_dim], gates[:, 4 * self.hidden_dim:]
        h, c, (*_, tanh_c) = lstm_update(lstm_gates, c_prev, self.dtype)
        sentinel = (jax.nn.sigmoid(sentinel_gate.astype(jnp.float32)) * tanh_c).astype(self.dtype)
        query = self.query(h)
        candidates = jnp.concatenate([keys, self.sentinel_key(sentinel)[:, None, :]], axis=1)
        scores = self.score(jnp.tanh(candidates + query[:, None, :]))[..., 0]
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)  # (B, P + 1)
        alpha, beta = weights[:, :-1], weights[:, -1:]
        attended = (precision.einsum("bp,bph->bh", alpha.astype(self.dtype), visual) +
                    beta.astype(self.dtype) * sentinel)
        return (h, c), {"hidden": attended + h, "alpha": alpha}
