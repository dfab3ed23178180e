"""``transformer``: a small transformer decoder over the image's regions.

Pre-LayerNorm blocks of causal self-attention over the words so far,
cross-attention over the regions (projected to ``width``, with 2-D sinusoidal
positions so that "left of" can be seen) and a GELU MLP. Words are the GloVe
embeddings projected to ``width`` plus sinusoidal positions.

Teacher forcing runs all positions in parallel (``teacher_forced``); decoding
runs one position at a time against a key/value cache of ``max_length``
positions kept in the state, so every search (greedy, sampling, beam) drives
it through the same ``decode_step`` as the LSTMs; a test shows both give the
same logits. The reported attention is the last block's cross-attention,
averaged over heads.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models import precision
from jaxcap.models.decoders.base import AT_LEAST_1, Decoder


def sinusoid(positions, width: int):
    """``(..., width)`` sinusoidal embeddings of integer or real ``positions``."""
    rates = 1.0 / 10000 ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width)
    angles = positions[..., None].astype(jnp.float32) * rates
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def grid_positions(height: int, width: int, channels: int):
    """``(height * width, channels)``: row and column sinusoids side by side."""
    rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    half = channels // 2
    return jnp.concatenate([sinusoid(rows.reshape(-1), half),
                            sinusoid(cols.reshape(-1), channels - half)], axis=-1)


def attend(queries, keys, values, mask=None):
    """Multi-head attention of queries ``(B, Q, H, d)`` over keys ``(B, K, H, d)``: the
    outputs ``(B, Q, H, d)`` and the weights ``(B, H, Q, K)``."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", queries, keys,
                        preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(queries.shape[-1]))
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return precision.einsum("bhqk,bkhd->bqhd", weights.astype(values.dtype), values), weights


class Block(nn.Module):
    width: int
    heads: int
    mlp_dim: int
    dropout_rate: float
    dtype: Any = jnp.float32

    def setup(self):
        dense = lambda n: precision.Dense(n, self.dtype)  # noqa: E731
        self.self_norm, self.cross_norm, self.mlp_norm = (nn.LayerNorm(dtype=self.dtype)
                                                          for _ in range(3))
        self.self_qkv, self.self_out = dense(3 * self.width), dense(self.width)
        self.cross_q, self.cross_kv, self.cross_out = (dense(self.width), dense(2 * self.width),
                                                       dense(self.width))
        self.mlp_in, self.mlp_out = dense(self.mlp_dim), dense(self.width)
        self.dropout = nn.Dropout(self.dropout_rate)

    def _heads(self, x):
        return x.reshape(*x.shape[:-1], self.heads, self.width // self.heads)

    def memory(self, memory):
        """Cross-attention keys and values of the regions, computed once per image."""
        keys, values = jnp.split(self.cross_kv(memory), 2, axis=-1)
        return self._heads(keys), self._heads(values)

    def self_qkv_of(self, x):
        return tuple(self._heads(part) for part in jnp.split(self.self_qkv(self.self_norm(x)), 3,
                                                              axis=-1))

    def finish(self, x, self_attended, memory, train: bool):
        """The block after self-attention: returns ``x`` and the cross-attention (B, H, Q, P)."""
        drop = lambda y: self.dropout(y, deterministic=not train)  # noqa: E731
        x = x + drop(self.self_out(self_attended.reshape(*x.shape[:-1], self.width)))
        crossed, weights = attend(self._heads(self.cross_q(self.cross_norm(x))), *memory)
        x = x + drop(self.cross_out(crossed.reshape(*x.shape[:-1], self.width)))
        x = x + drop(self.mlp_out(nn.gelu(self.mlp_in(self.mlp_norm(x)))))
        return x, weights


class TransformerDecoder(Decoder):
    layers: int = 2
    heads: int = 4
    width: int = 256
    mlp_dim: int = 1024

    RULES = {**Decoder.RULES, "layers": AT_LEAST_1, "heads": AT_LEAST_1, "width": AT_LEAST_1,
             "mlp_dim": AT_LEAST_1}

    @classmethod
    def check_settings(cls, settings: dict, names: dict | None = None) -> None:
        super().check_settings(settings, names)
        names = names or {}
        width = names.get("width", "width")
        if settings["width"] % 4:  # the regions' 2-D positions: a sine and a cosine per axis
            raise ValueError(f"{width}={settings['width']}: must be a multiple of 4")
        if settings["width"] % settings["heads"]:  # each head takes width / heads channels
            raise ValueError(f"{width}={settings['width']}: must be a multiple of "
                             f"{names.get('heads', 'heads')} ({settings['heads']})")

    def setup(self):
        super().setup()
        self.word_projection = self.dense(self.width)
        self.region_projection = self.dense(self.width)
        self.region_norm = nn.LayerNorm(dtype=self.dtype)
        self.blocks = [Block(self.width, self.heads, self.mlp_dim, self.dropout_rate, self.dtype)
                       for _ in range(self.layers)]
        self.final_norm = nn.LayerNorm(dtype=self.dtype)

    def _words(self, words, positions, train: bool):
        x = self.word_projection(words) + sinusoid(positions, self.width).astype(self.dtype)
        return self.dropout(x, deterministic=not train)

    def start(self, features, max_length: int):
        batch, height, width = features.shape[:3]
        regions = features.reshape(batch, height * width, -1).astype(self.dtype)
        positions = grid_positions(height, width, self.width).astype(self.dtype)
        memory = self.region_norm(self.region_projection(regions) + positions)
        cache = jnp.zeros((batch, max_length, self.heads, self.width // self.heads), self.dtype)
        state = (tuple(cache for _ in self.blocks), tuple(cache for _ in self.blocks),
                 jnp.zeros(batch, jnp.int32))
        return tuple(block.memory(memory) for block in self.blocks), state

    def teacher_forced(self, context, state, tokens, train: bool) -> dict:
        """All positions at once, each attending to itself and the words before it."""
        length = tokens.shape[1]
        x = self._words(self.embed(tokens), jnp.arange(length)[None, :], train)
        causal = jnp.tril(jnp.ones((length, length), bool))
        for block, memory in zip(self.blocks, context):
            attended, _ = attend(*block.self_qkv_of(x), causal)
            x, cross = block.finish(x, attended, memory, train)
        return self.outputs({"hidden": self.final_norm(x), "alpha": cross.mean(axis=1)}, train)

    def step(self, context, state, word, train: bool):
        """One position: its keys and values join the cache, its query reads the cache."""
        cached_keys, cached_values, t = state
        positions = jnp.arange(cached_keys[0].shape[1])
        here = (positions == t[:, None])[:, :, None, None]  # (B, L, 1, 1)
        visible = (positions <= t[:, None])[:, None, None, :]  # (B, 1, 1, L)
        x = self._words(word[:, None, :], t[:, None], train)
        keys_out, values_out = [], []
        for block, memory, keys, values in zip(self.blocks, context, cached_keys, cached_values):
            query, key, value = block.self_qkv_of(x)
            keys, values = jnp.where(here, key, keys), jnp.where(here, value, values)
            attended, _ = attend(query, keys, values, visible)
            x, cross = block.finish(x, attended, memory, train)
            keys_out.append(keys)
            values_out.append(values)
        state = (tuple(keys_out), tuple(values_out), t + 1)
        return state, {"hidden": self.final_norm(x)[:, 0], "alpha": cross.mean(axis=1)[:, 0]}
