"""Attention over image regions, chosen by name (``decoder.variant`` in the config).

An attention variant is two pieces, so that the decoder can keep every matmul
that does not depend on the previous step outside its scan:

* ``project(features)`` runs once per image, before the scan: whatever the
  variant can precompute from the regions alone (``(B, P, A)`` for soft).
* ``weights(projected, query)`` runs at every step with the decoder's query
  (already projected to ``A`` by the decoder, fused with its other
  h-matmuls) and returns the attention weights ``alpha (B, P)``; the decoder
  makes the context ``sum_p alpha_p * region_p`` from them.

The decoder's hand-written backward pass differentiates ``weights`` with
``jax.vjp``, so a variant needs no gradient code of its own. Adding a variant
is one class here and one entry in ``ATTENTIONS``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class SoftAttention(nn.Module):
    """Show, Attend and Tell's additive (Bahdanau) attention with a softmax over regions."""

    attention_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        self.encoder_projection = nn.Dense(self.attention_dim, dtype=self.dtype, name="encoder")
        # No bias: a softmax ignores a shift of all scores, so a bias only collects noise.
        self.score = nn.Dense(1, use_bias=False, dtype=self.dtype, name="score")

    def project(self, features):
        return self.encoder_projection(features)

    def weights(self, projected, query):
        scores = self.score(nn.relu(projected + query[:, None, :]))[..., 0]  # (B, P)
        return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


ATTENTIONS = {"soft": SoftAttention}


def make_attention(variant: str, attention_dim: int, dtype=jnp.float32, name: str = "attention"):
    if variant not in ATTENTIONS:
        raise ValueError(f"unknown attention variant {variant!r}; known: {sorted(ATTENTIONS)}")
    return ATTENTIONS[variant](attention_dim, dtype=dtype, name=name)
