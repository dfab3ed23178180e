"""``updown``: Bottom-Up and Top-Down attention's decoder (Anderson et al. 2018), on grid features.

Two LSTMs per step. The top-down attention LSTM reads the language LSTM's
previous ``h``, the mean image feature and the word; its ``h`` queries the
regions (additive attention, as ``soft``); the language LSTM reads the
attended feature and the attention LSTM's ``h`` and its ``h`` is read out.
The paper attends over detected objects; here the regions are the encoder's
grid cells.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxcap.models import precision
from jaxcap.models.attention import AdditiveAttention
from jaxcap.models.decoders.base import AT_LEAST_1, Decoder, lstm_update, regions_of


class UpDownDecoder(Decoder):
    attention_dim: int = 512

    RULES = {**Decoder.RULES, "attention_dim": AT_LEAST_1}

    def setup(self):
        super().setup()
        self.attention = AdditiveAttention(self.attention_dim, self.dtype)
        self.query = self.dense(self.attention_dim, use_bias=False)
        self.attention_lstm_input = self.dense(4 * self.hidden_dim)
        self.attention_lstm_h = self.dense(4 * self.hidden_dim, use_bias=False)
        self.language_lstm_input = self.dense(4 * self.hidden_dim)
        self.language_lstm_h = self.dense(4 * self.hidden_dim, use_bias=False)

    def start(self, features, max_length: int):
        regions = regions_of(features, self.dtype)
        zeros = jnp.zeros((regions.shape[0], self.hidden_dim), jnp.float32)
        h0 = zeros.astype(self.dtype)
        return (regions, self.attention.project(regions), regions.mean(axis=1)), \
            (h0, zeros, h0, zeros)

    def step(self, context, state, word, train: bool):
        regions, projected, mean = context
        h_attention, c_attention, h_language, c_language = state
        inputs = jnp.concatenate([h_language, mean, word.astype(self.dtype)], axis=-1)
        gates = self.attention_lstm_input(inputs) + self.attention_lstm_h(h_attention)
        h_attention, c_attention, _ = lstm_update(gates, c_attention, self.dtype)
        alpha = self.attention.weights(projected, self.query(h_attention))
        attended = precision.einsum("bp,bpd->bd", alpha.astype(regions.dtype), regions)
        gates = (self.language_lstm_input(jnp.concatenate([attended, h_attention], axis=-1)) +
                 self.language_lstm_h(h_language))
        h_language, c_language, _ = lstm_update(gates, c_language, self.dtype)
        return (h_attention, c_attention, h_language, c_language), \
            {"hidden": h_language, "alpha": alpha}
