"""Additive (Bahdanau) attention over image regions, shared by the LSTM decoder variants.

Two pieces, so that a decoder can keep every matmul that does not depend on
the previous step outside its loop:

* ``project(regions)`` runs once per image: ``(B, P, A)``.
* ``weights(projected, query)`` runs at every step with the decoder's query
  (already projected to ``A`` by the decoder, where it can fuse that with its
  other matmuls) and returns the softmax weights ``alpha (B, P)``; the decoder
  makes the context ``sum_p alpha_p * region_p`` from them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models import precision


class AdditiveAttention(nn.Module):
    """``alpha = softmax_p(w . relu(W regions_p + query))``, as Show, Attend and Tell."""

    attention_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder = precision.Dense(self.attention_dim, self.dtype)
        # No bias: a softmax ignores a shift of all scores, so a bias only collects noise.
        self.score = precision.Dense(1, self.dtype, use_bias=False)

    def project(self, regions):
        return self.encoder(regions)

    def scores(self, projected, query):
        return self.score(nn.relu(projected + query[:, None, :]))[..., 0].astype(jnp.float32)

    def weights(self, projected, query):
        return jax.nn.softmax(self.scores(projected, query), axis=-1)
