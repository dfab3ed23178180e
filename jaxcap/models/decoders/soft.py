"""``soft``: Show, Attend and Tell's decoder with soft attention, and its fast path.

Per caption: the initial ``h``/``c`` come from the mean image feature; at every
step the LSTM reads the word embedding and the attention context, gated by
``f_beta = sigmoid(W h)``; the readout reads ``dropout(h)``; the loss adds the
doubly stochastic attention penalty (``alpha_c``).

The step (``step``) is all a researcher needs; the generic path trains it.
This variant also has a fast teacher-forced path (``fast_path``, on by
default; tested equal to the generic one in loss and every gradient):

* Only what depends on the previous step's ``h`` runs inside the loop, as one
  fused matmul of ``h`` (the attention query, the ``f_beta`` gate and the
  LSTM's recurrent gates together) plus the context's share of the LSTM gates;
  the embeddings' share of the gates is computed for all steps at once.
* The backward pass of the loop is written by hand (``nn.custom_vjp``): XLA's
  transpose of a scan accumulates every weight gradient inside the loop, as a
  32-row outer product per step read and written through memory; here the loop
  only carries the gradients that must flow backwards in time (``h``, ``c``,
  the projected regions) and saves each step's matmul inputs and output
  gradients, so that the weight gradients of the fused ``h`` matmul and of the
  context gates are two large matmuls after the loop. The attention is
  differentiated with ``jax.vjp`` inside the loop. In bfloat16 these four
  products take bfloat16 operands, in the plain form XLA's CPU backend runs fast
  (``_times_transposed``, ``_weight_gradient``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models import precision
from jaxcap.models.attention import AdditiveAttention
from jaxcap.models.decoders.base import (AT_LEAST_0, AT_LEAST_1, Decoder,
                                         doubly_stochastic_penalty, lstm_update, regions_of)


class SoftAttentionDecoder(Decoder):
    attention_dim: int = 512
    alpha_c: float = 1.0  # weight of the doubly stochastic attention penalty
    fast_path: bool = True  # the hand-written backward pass; False: the generic path

    RULES = {**Decoder.RULES, "attention_dim": AT_LEAST_1, "alpha_c": AT_LEAST_0}

    def setup(self):
        super().setup()
        self.init_h = self.dense(self.hidden_dim)
        self.init_c = self.dense(self.hidden_dim)
        self.attention = AdditiveAttention(self.attention_dim, self.dtype)
        self.word_gates = self.dense(4 * self.hidden_dim)
        # Query, f_beta gate and recurrent LSTM gates: one matmul of h per step.
        self.h_projection = self.dense(self.attention_dim + self.feature_dim + 4 * self.hidden_dim)
        self.context_gates = self.dense(4 * self.hidden_dim, use_bias=False)

    def start(self, features, max_length: int):
        regions = regions_of(features, self.dtype)
        mean = regions.mean(axis=1)
        initial = (self.init_h(mean), self.init_c(mean).astype(jnp.float32))  # float32 cell
        return (regions, self.attention.project(regions)), initial

    def step(self, context, state, word, train: bool):
        regions, projected = context
        state, out, _ = self.gated_step(state, self.word_gates(word), projected, regions, train)
        return state, out

    def gated_step(self, carry, word_gates, projected, regions, train: bool = False,
                   context_kernel_t=None, choice=None):
        """The step from the word's share of the gates; also returns what the
        hand-written backward pass needs. ``context_kernel_t``: the context gates'
        kernel stored transposed (see ``_scan``); ``choice``: the region of a variant
        that chooses one (``hard``)."""
        h_prev, c_prev = carry
        a, d = self.attention_dim, self.feature_dim
        fused = self.h_projection(h_prev)
        query, gate, h_gates = fused[:, :a], fused[:, a:a + d], fused[:, a + d:]
        alpha = self.attention.weights(projected, query)
        context, extras = self.glimpse(alpha, regions, train, choice)
        sigma = jax.nn.sigmoid(gate)
        gated = context * sigma
        if context_kernel_t is None:
            context_gates = self.context_gates(gated)
        else:
            context_gates = jnp.dot(gated, context_kernel_t.T)
        gates = word_gates + h_gates + context_gates
        h, c, (i, f, g, o, tanh_c) = lstm_update(gates, c_prev, self.dtype)
        saved = (h_prev, c_prev, query, context, sigma, gated, i, f, g, o, tanh_c)
        return (h, c), {"hidden": h, "alpha": alpha, **extras}, saved

    def glimpse(self, alpha, regions, train: bool, choice=None):
        """What the step sees of the image: the expected region under ``alpha``."""
        return precision.einsum("bp,bpd->bd", alpha.astype(regions.dtype), regions), {}

    def losses(self, outputs, token_logp, mask, weights, train: bool) -> dict:
        return doubly_stochastic_penalty(outputs["alphas"], mask, weights, self.alpha_c)

    def teacher_forced(self, context, state, tokens, train: bool) -> dict:
        if not self.fast_path:
            return super().teacher_forced(context, state, tokens, train)
        regions, projected = context
        word_gates = self.word_gates(self.embed(tokens))  # (B, T, 4H), all steps at once
        backward = functools.partial(_scan_backward, (self.attention_dim, self.dtype))
        recurrence = nn.custom_vjp(_scan_steps, forward_fn=_scan_steps_saving,
                                   backward_fn=backward)
        hidden, alphas = recurrence(self, state, word_gates.swapaxes(0, 1), projected, regions)
        return self.outputs({"hidden": hidden.swapaxes(0, 1), "alpha": alphas.swapaxes(0, 1)},
                            train)


# -------------------------------------------------------------------- the loop


def _scan(module: SoftAttentionDecoder, carry, word_gates, projected, regions, saving: bool):
    """The step over time (axis 0 of ``word_gates``): hidden states (T, B, H) and
    attention weights (T, B, P), and the backward pass's residuals when ``saving``."""
    def body(module, carry, gates, projected, regions, kernel_t):
        carry, out, saved = module.gated_step(carry, gates, projected, regions,
                                              context_kernel_t=kernel_t)
        return carry, ((out["hidden"], out["alpha"]), saved if saving else ())

    # XLA's CPU dot runs the M=32-row float32 product of the context gates (32 x 2048
    # x 2048) about twice as fast with the weight stored transposed (a copy made
    # once, outside the loop), which made the training step ~15% faster on an Intel
    # Xeon; in bfloat16 the plain layout is the fast one (benchmarks/shapes_bench.py).
    # The copy is made row-major behind a barrier, as a flat vector: a plain ``.T``
    # was laid out column-major (a relabelling, yet copied element by element) and
    # then copied again into the loop's row-major operand, two passes where one does.
    kernel_t = None
    if module.dtype == jnp.float32 and not module.is_initializing():
        kernel = module.variables["params"]["context_gates"]["kernel"]
        kernel_t = jax.lax.optimization_barrier(kernel.T.ravel()).reshape(kernel.shape[::-1])
    scan = nn.scan(
        body,
        variable_broadcast="params",
        split_rngs={"params": False, "dropout": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
        out_axes=0)
    _, (outputs, saved) = scan(module, carry, word_gates, projected, regions, kernel_t)
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
    attention_dim, dtype = attention_spec
    attention = AdditiveAttention(attention_dim, dtype)
    times_w_h_t = _times_transposed(params["h_projection"]["kernel"], dtype)
    times_w_c_t = _times_transposed(params["context_gates"]["kernel"], dtype)

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
        d_gated = times_w_c_t(d_gates)
        d_context = d_gated * f32(sigma)
        d_gate = d_gated * f32(context) * f32(sigma * (1 - sigma))
        d_alpha = jnp.einsum("bpd,bd->bp", f32(regions), d_context) + f32(d_alpha_out)
        _, attention_vjp = jax.vjp(weights, params["attention"], projected, query)
        d_attention_step, d_projected_step, d_query = attention_vjp(d_alpha)
        d_fused = jnp.concatenate([f32(d_query), d_gate, d_gates], axis=-1)
        carry = (times_w_h_t(d_fused), dc * f, d_projected + f32(d_projected_step),
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
    d_params["h_projection"] = {"kernel": _weight_gradient(h_prev, d_fused, dtype),
                                "bias": d_fused.sum(axis=(0, 1))}
    d_params["context_gates"] = {"kernel": _weight_gradient(gated, d_gates, dtype)}
    d_params["attention"] = d_attention
    d_params = jax.tree.map(lambda d, p: d.astype(p.dtype), d_params, params)
    d_regions = jnp.einsum("tbp,tbd->bpd", alphas, d_context)
    (h0, c0) = saved[0][0], saved[1][0]
    return ({"params": d_params}, (dh0.astype(h0.dtype), dc0.astype(c0.dtype)),
            d_gates.astype(dtype), d_projected.astype(projected.dtype),
            d_regions.astype(regions.dtype))


# The backward pass's products. In float32 as the forward's transpose gives them. In
# bfloat16 on bfloat16 operands accumulating in float32 (the forward's contract) and in
# the plain ``x @ w`` form, both operands stored so: XLA's CPU backend runs a bfloat16
# product with a transposed operand (``dy @ W.T``, ``x.T @ dy``) at float32 speed, the
# plain form on the AVX-512 BF16/AMX kernels, 2-2.3x faster at these shapes on a Xeon.


def _times_transposed(kernel, dtype):
    """``d -> d @ kernel.T``; in bfloat16 against a transposed copy made once, outside
    the reverse loop (a loop boundary XLA does not fold the transpose across)."""
    if dtype == jnp.float32:
        return lambda d: d @ kernel.T
    kernel_t = kernel.T.astype(dtype)
    return lambda d: jnp.dot(d.astype(dtype), kernel_t, preferred_element_type=jnp.float32)


def _weight_gradient(inputs, d_outputs, dtype):
    """``sum_t inputs_t.T @ d_outputs_t``: (T, B, I), (T, B, O) -> (I, O) in float32."""
    if dtype == jnp.float32:
        return jnp.einsum("tbi,tbo->io", inputs.astype(jnp.float32), d_outputs)
    rows, width = inputs.shape[0] * inputs.shape[1], inputs.shape[2]
    # The transposed inputs stored row-major. Behind a barrier as a flat vector: XLA
    # would otherwise lay the transpose out column-major (a free relabelling), and a
    # bfloat16 product of that layout is done in float32.
    flat_t = jax.lax.optimization_barrier(inputs.reshape(rows, width).T.astype(dtype).ravel())
    return jnp.dot(flat_t.reshape(width, rows), d_outputs.reshape(rows, -1).astype(dtype),
                   preferred_element_type=jnp.float32)
