"""The scanned attention-LSTM caption decoder (Show, Attend and Tell).

Per caption: the initial ``h``/``c`` come from the mean image feature; at every
step the LSTM reads the word embedding and the attention context, gated by
``f_beta = sigmoid(W h)``; the output layer reads ``dropout(h)``.

Where the work goes. Only what depends on the previous step's ``h`` runs
inside the ``nn.scan`` loop, and it runs as one fused matmul of ``h`` (the
attention query, the ``f_beta`` gate and the LSTM's recurrent gates together)
plus the context's share of the LSTM gates. Everything else is batched over
all steps outside the loop: the encoder-side attention projection (once per
image), the embeddings' share of the LSTM gates (teacher forcing knows every
input word), and the output layer over all hidden states at once.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models.attention import make_attention


class CaptionDecoder(nn.Module):
    vocab_size: int
    feature_dim: int
    embed_dim: int = 50
    hidden_dim: int = 512
    attention_dim: int = 512
    variant: str = "soft"
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    def setup(self):
        dense = lambda n, name, bias=True: nn.Dense(n, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                                    name=name)
        self.embed = nn.Embed(self.vocab_size, self.embed_dim, name="embed")
        self.init_h = dense(self.hidden_dim, "init_h")
        self.init_c = dense(self.hidden_dim, "init_c")
        self.attention = make_attention(self.variant, self.attention_dim, self.dtype)
        self.word_gates = dense(4 * self.hidden_dim, "word_gates")
        # Query, f_beta gate and recurrent LSTM gates: one matmul of h per step.
        self.h_projection = dense(self.attention_dim + self.feature_dim + 4 * self.hidden_dim,
                                  "h_projection")
        self.context_gates = dense(4 * self.hidden_dim, "context_gates", bias=False)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.output = dense(self.vocab_size, "output")

    # ------------------------------------------------------------------ pieces

    def start(self, features):
        """Per-image work done once: ``(regions (B, P, D), projected, (h, c))``."""
        regions = features.reshape(features.shape[0], -1, features.shape[-1]).astype(self.dtype)
        mean = regions.mean(axis=1)
        carry = (self.init_h(mean), self.init_c(mean))
        return regions, self.attention.project(regions), carry

    def step(self, carry, word_gates, projected, regions):
        """One LSTM step from precomputed word gates; returns the new carry, h and alpha."""
        h, c = carry
        a, d = self.attention_dim, self.feature_dim
        fused = self.h_projection(h)
        query, gate, h_gates = fused[:, :a], fused[:, a:a + d], fused[:, a + d:]
        context, alpha = self.attention.attend(projected, regions, query)
        context = context * jax.nn.sigmoid(gate)
        gates = word_gates + h_gates + self.context_gates(context)
        i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(self.dtype)
        return (h, c), (h, alpha)

    def logits(self, hidden, train: bool):
        return self.output(self.dropout(hidden, deterministic=not train)).astype(jnp.float32)

    def decode_step(self, tokens, carry, projected, regions):
        """Inference: next-word logits (B, V) and alpha (B, P) after ``tokens`` (B,)."""
        carry, (h, alpha) = self.step(carry, self.word_gates(self.embed(tokens)), projected,
                                      regions)
        return carry, self.logits(h, train=False), alpha

    # ----------------------------------------------------------- teacher forcing

    def __call__(self, features, tokens, train: bool = False):
        """Teacher forcing: ``tokens`` (B, T) are the inputs; returns logits (B, T, V)
        and attention weights (B, T, P)."""
        regions, projected, carry = self.start(features)
        word_gates = self.word_gates(self.embed(tokens))  # (B, T, 4H), all steps at once
        scan = nn.scan(
            lambda module, carry, gates, projected, regions:
                module.step(carry, gates, projected, regions),
            variable_broadcast="params",
            split_rngs={"params": False, "dropout": True},
            in_axes=(1, nn.broadcast, nn.broadcast),
            out_axes=1)
        _, (hidden, alphas) = scan(self, carry, word_gates, projected, regions)
        return self.logits(hidden, train), alphas
