"""``none``: Show and Tell (Vinyals et al. 2015), an LSTM with no attention.

The image's mean feature initialises ``h`` and ``c``; with ``feed_image`` it is
also an input at every step, beside the word. Looking at the mean of the
regions is looking at all of them equally, so the reported attention is
uniform: attention maps and attention correctness work as for every variant,
and show the baseline an attending variant has to beat.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxcap.models.decoders.base import Decoder, lstm_update, regions_of


class ShowAndTellDecoder(Decoder):
    feed_image: bool = False  # the mean feature is an input at every step too

    def setup(self):
        super().setup()
        self.init_h = self.dense(self.hidden_dim)
        self.init_c = self.dense(self.hidden_dim)
        self.word_gates = self.dense(4 * self.hidden_dim)
        self.h_gates = self.dense(4 * self.hidden_dim, use_bias=False)
        if self.feed_image:
            self.image_gates = self.dense(4 * self.hidden_dim, use_bias=False)

    def start(self, features, max_length: int):
        regions = regions_of(features, self.dtype)
        mean = regions.mean(axis=1)
        uniform = jnp.full(regions.shape[:2], 1.0 / regions.shape[1], jnp.float32)
        image_gates = self.image_gates(mean) if self.feed_image else jnp.zeros(())
        initial = (self.init_h(mean), self.init_c(mean).astype(jnp.float32))  # float32 cell
        return (image_gates, uniform), initial

    def step(self, context, state, word, train: bool):
        image_gates, uniform = context
        h_prev, c_prev = state
        gates = self.word_gates(word) + self.h_gates(h_prev) + image_gates
        h, c, _ = lstm_update(gates, c_prev, self.dtype)
        return (h, c), {"hidden": h, "alpha": uniform}
