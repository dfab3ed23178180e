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

The backward pass of the loop is written by hand (``nn.custom_vjp``): XLA's
transpose of a scan accumulates every weight gradient inside the loop, as a
32-row outer product per step read and written through memory; here the loop
only carries the gradients that must flow backwards in time (``h``, ``c``,
the projected regions) and saves each step's matmul inputs and output
gradients, so that the weight gradients of the fused ``h`` matmul and of the
context gates are two large matmuls after the loop. The attention variant is
differentiated with ``jax.vjp`` inside the loop, so variants need no gradient
code. Tested equal to autodiff of the unrolled step.
"""

from __future__ import annotations

import functools
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
        carry, outputs, _ = self.step_with_residuals(carry, word_gates, projected, regions)
        return carry, outputs

    def step_with_residuals(self, carry, word_gates, projected, regions):
        """``step``, plus what its hand-written backward pass needs."""
        h_prev, c_prev = carry
        a, d = self.attention_dim, self.feature_dim
        fused = self.h_projection(h_prev)
        query, gate, h_gates = fused[:, :a], fused[:, a:a + d], fused[:, a + d:]
        alpha = self.attention.weights(projected, query)
        context = jnp.einsum("bp,bpd->bd", alpha.astype(regions.dtype), regions)
        sigma = jax.nn.sigmoid(gate)
        gated = context * sigma
        gates = word_gates + h_gates + self.context_gates(gated)
        i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c_prev + i * g
        tanh_c = jnp.tanh(c)
        h = (o * tanh_c).astype(self.dtype)
        saved = (h_prev, c_prev, query, context, sigma, gated, i, f, g, o, tanh_c)
        return (h, c), (h, alpha), saved

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
        backward = functools.partial(_scan_backward, self.attention_spec())
        recurrence = nn.custom_vjp(_scan_steps, forward_fn=_scan_steps_saving,
                                   backward_fn=backward)
        hidden, alphas = recurrence(self, carry, word_gates.swapaxes(0, 1), projected, regions)
        return self.logits(hidden.swapaxes(0, 1), train), alphas.swapaxes(0, 1)

    def attention_spec(self) -> tuple:
        """What the backward pass needs to rebuild the attention module without a scope."""
        return (self.variant, self.attention_dim, self.dtype)


# -------------------------------------------------------------------- the loop


def _scan(module: CaptionDecoder, carry, word_gates, projected, regions, saving: bool):
    """The step over time (axis 0 of ``word_gates``): hidden states (T, B, H) and
    attention weights (T, B, P), and the backward pass's residuals when ``saving``."""
    def body(module, carry, gates, projected, regions):
        carry, outputs, saved = module.step_with_residuals(carry, gates, projected, regions)
        return carry, (outputs, saved if saving else ())

    scan = nn.scan(
        body,
        variable_broadcast="params",
        split_rngs={"params": False, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        out_axes=0)
    _, (outputs, saved) = scan(module, carry, word_gates, projected, regions)
    return outputs, saved


def _scan_steps(module, carry, word_gates, projected, regions):
    return _scan(module, carry, word_gates, projected, regions, saving=False)[0]


def _scan_steps_saving(module, carry, word_gates, projected, regions):
    (hidden, alphas), saved = _scan(module, carry, word_gates, projected, regions, saving=True)
    return (hidden, alphas), (module.variables["params"], projected, regions, alphas, saved)


def _scan_backward(attention_spec, residuals, cotangents):
    """The loop's VJP: gradients back through time inside a reverse scan, weight
    gradients of the two large matmuls after it."""
    params, projected, regions, alphas, saved = residuals
    d_hidden, d_alphas = cotangents
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    w_h = f32(params["h_projection"]["kernel"])
    w_c = f32(params["context_gates"]["kernel"])
    variant, attention_dim, dtype = attention_spec
    attention = make_attention(variant, attention_dim, dtype)

    def weights(attention_params, projected, query):
        return attention.apply({"params": attention_params}, projected, query, method="weights")

    def body(carry, step):
        dh, dc, d_projected, d_attention = carry
        (h_prev, c_prev, query, context, sigma, gated, i, f, g, o, tanh_c), alpha, dh_out, \
            d_alpha_out = step
        dh = dh + f32(dh_out)
        dc = dc + dh * o * (1 - tanh_c * tanh_c)
        d_gates = jnp.concatenate([dc * g * i * (1 - i), dc * c_prev * f * (1 - f),
                                   dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], axis=-1)
        d_gated = d_gates @ w_c.T
        d_context = d_gated * f32(sigma)
        d_gate = d_gated * f32(context) * f32(sigma * (1 - sigma))
        d_alpha = jnp.einsum("bpd,bd->bp", f32(regions), d_context) + f32(d_alpha_out)
        _, attention_vjp = jax.vjp(weights, params["attention"], projected, query)
        d_attention_step, d_projected_step, d_query = attention_vjp(d_alpha)
        d_fused = jnp.concatenate([f32(d_query), d_gate, d_gates], axis=-1)
        carry = (d_fused @ w_h.T, dc * f, d_projected + f32(d_projected_step),
                 jax.tree.map(lambda a, b: a + f32(b), d_attention, d_attention_step))
        return carry, (d_fused, d_gates, d_context)

    batch, hidden = d_hidden.shape[1:]
    start = (jnp.zeros((batch, hidden), jnp.float32), jnp.zeros((batch, hidden), jnp.float32),
             jnp.zeros(projected.shape, jnp.float32),
             jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params["attention"]))
    (dh0, dc0, d_projected, d_attention), (d_fused, d_gates, d_context) = jax.lax.scan(
        body, start, (saved, alphas, d_hidden, d_alphas), reverse=True)
    h_prev, gated = saved[0], saved[5]
    d_params = jax.tree.map(jnp.zeros_like, params)
    d_params["h_projection"] = {"kernel": jnp.einsum("tbi,tbo->io", f32(h_prev), d_fused),
                                "bias": d_fused.sum(axis=(0, 1))}
    d_params["context_gates"] = {"kernel": jnp.einsum("tbi,tbo->io", f32(gated), d_gates)}
    d_params["attention"] = d_attention
    d_params = jax.tree.map(lambda d, p: d.astype(p.dtype), d_params, params)
    d_regions = jnp.einsum("tbp,tbd->bpd", alphas, d_context)
    (h0, c0) = saved[0][0], saved[1][0]
    return ({"params": d_params}, (dh0.astype(h0.dtype), dc0.astype(c0.dtype)),
            d_gates.astype(dtype), d_projected.astype(projected.dtype),
            d_regions.astype(regions.dtype))
