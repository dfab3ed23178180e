"""The decoder protocol: what a variant writes, and what every variant gets for free.

A variant is forward code only. It writes:

* ``start(features, max_length) -> (context, state)``: the per-image work done
  once. ``features`` is the encoder's grid ``(B, H, W, D)``; ``context`` is
  whatever every step reads and never changes (the regions, their
  projections); ``state`` is what one step hands to the next (an LSTM's
  ``(h, c)``, a transformer's key/value cache). Both are pytrees of arrays with
  the batch first. ``max_length`` is the most steps that will follow.
* ``step(context, state, word, train) -> (state, out)``: one step from the
  embedded previous word ``word (B, E)``. ``out`` is a dict with ``hidden``
  (what the readout turns into next-word logits), ``alpha (B, P)``, the
  attention over the image's regions the word after this step is emitted under
  (they sum to 1, or to the visual share where the variant can look elsewhere),
  and anything else the variant's own loss terms need, per example.
* optionally ``losses(outputs, token_logp, mask, weights, train)``: extra loss
  terms, ``{name: (sum over this batch, per)}`` with ``per`` ``"token"`` or
  ``"example"`` saying what the trainer divides the sum by (the global count).
* optionally a faster ``teacher_forced``; a test must then show that it equals
  the generic one in loss and every gradient.
* optionally a choice besides the word (``CHOOSES = True``; hard attention's
  region): ``step`` then takes ``choice=None``. In inference its step draws the
  choice from the ``sample`` stream when one is given (a rollout of the policy,
  ``policy_step``; without one, a search, it takes the most likely), or takes the
  ``choice`` (B,) given (a replay of a rollout, ``teacher_forced(...,
  choices=...)``), and reports ``choice`` and its log-probability
  ``choice_logp`` in ``out``. SCST samples such a variant's choices with its
  words and differentiates their log-probabilities with the words'.

Every variant gets: the word embedding (``embed``, GloVe-initialised by the
trainer), the readout (``logits``: dropout, then a dense layer to the
vocabulary), the teacher-forced pass over a caption (``nn.scan`` over ``step``,
differentiated by ordinary autodiff; the readout runs once over all steps,
outside the loop) and the inference step every search uses (``decode_step``).
Nothing outside a variant's own file and the registry knows which variant runs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models import precision

# The random streams a step may draw from: dropout, and a variant's own samples.
STEP_RNGS = ("dropout", "sample")

# What a setting's value must be: (test, the words an error says it with).
AT_LEAST_1 = (lambda value: value >= 1, "at least 1")
AT_LEAST_0 = (lambda value: value >= 0, "at least 0")
FRACTION = (lambda value: 0 <= value < 1, "at least 0 and below 1")
PROBABILITY = (lambda value: 0 <= value <= 1, "at least 0 and at most 1")


class Decoder(nn.Module):
    """Base class of the variants: shared fields, the embedding, the readout, the loops."""

    vocab_size: int
    feature_dim: int
    embed_dim: int = 50
    hidden_dim: int = 512
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    # field -> what its value must be; a variant adds its own fields' (``{**Base.RULES, ...}``)
    RULES = {"embed_dim": AT_LEAST_1, "hidden_dim": AT_LEAST_1, "dropout_rate": FRACTION}
    # Whether a step makes a choice besides the word (see the protocol above).
    CHOOSES = False

    @classmethod
    def check_settings(cls, settings: dict, names: dict | None = None) -> None:
        """A ``ValueError`` for the first of ``settings`` (field -> value, every field)
        outside its range; ``names`` (field -> what to call it) names the config's key.
        ``make_decoder`` calls it before anything is built, ``setup`` for decoders made
        directly; a variant with settings that constrain each other adds to it."""
        names = names or {}
        for field, (test, words) in cls.RULES.items():
            if not test(settings[field]):
                raise ValueError(f"{names.get(field, field)}={settings[field]!r}: must be {words}")

    def setup(self):
        self.check_settings({field: getattr(self, field) for field in self.RULES})
        self.embed = nn.Embed(self.vocab_size, self.embed_dim)
        self.dropout = nn.Dropout(self.dropout_rate)
        self.output = self.dense(self.vocab_size)

    def dense(self, features: int, use_bias: bool = True) -> nn.Dense:
        return precision.Dense(features, self.dtype, use_bias=use_bias)

    # ------------------------------------------------------- what a variant writes

    def start(self, features, max_length: int):
        raise NotImplementedError

    def step(self, context, state, word, train: bool):
        raise NotImplementedError

    def losses(self, outputs: dict, token_logp, mask, weights, train: bool) -> dict:
        """Extra loss terms; ``token_logp`` (B, T) is the log-probability of each target
        word (0 at padding), ``mask`` (B, T) its weight, ``weights`` (B,) the examples'."""
        return {}

    # ------------------------------------------------------- what every variant gets

    def logits(self, hidden, train: bool):
        return self.output(self.dropout(hidden, deterministic=not train)).astype(jnp.float32)

    def __call__(self, features, tokens, train: bool = False, choices=None) -> dict:
        """Teacher forcing: ``tokens`` (B, T) are the input words. Returns a dict with
        ``logits`` (B, T, V), ``alphas`` (B, T, P) and the steps' other outputs (B, T, ...).
        ``choices`` (B, T): a variant that ``CHOOSES`` replays these choices (inference)."""
        context, state = self.start(features, tokens.shape[1])
        if choices is None:
            return self.teacher_forced(context, state, tokens, train)
        if not self.CHOOSES:
            raise ValueError(f"{type(self).__name__} makes no choice besides the word")
        return self.teacher_forced(context, state, tokens, train, choices=choices)

    def teacher_forced(self, context, state, tokens, train: bool, choices=None) -> dict:
        """The generic path: ``step`` scanned over time, the readout over all steps at once."""
        def body(module, state, inputs, context):
            word, choice = inputs
            if choice is None:
                return module.step(context, state, word, train)
            return module.step(context, state, word, train, choice=choice)

        scan = nn.scan(body, variable_broadcast=["params", "batch_stats"],
                       in_axes=(1, nn.broadcast),
                       out_axes=1,
                       split_rngs={"params": False, **{name: True for name in STEP_RNGS}})
        _, outputs = scan(self, state, (self.embed(tokens), choices), context)
        return self.outputs(outputs, train)

    def outputs(self, outputs: dict, train: bool) -> dict:
        """The steps' stacked outputs with the hidden states read out into logits."""
        outputs = dict(outputs)
        hidden = outputs.pop("hidden")
        return {"logits": self.logits(hidden, train), "alphas": outputs.pop("alpha"), **outputs}

    def decode_step(self, context, state, tokens):
        """Inference: ``(state, next-word logits (B, V), alpha (B, P))`` after ``tokens`` (B,)."""
        state, out = self.step(context, state, self.embed(tokens), train=False)
        return state, self.logits(out["hidden"], train=False), out["alpha"]

    def policy_step(self, context, state, tokens):
        """``decode_step`` of a variant that ``CHOOSES``, its choice drawn from the ``sample``
        stream: also ``(choice (B,), its log-probability (B,))``."""
        state, out = self.step(context, state, self.embed(tokens), train=False)
        return (state, self.logits(out["hidden"], train=False), out["alpha"], out["choice"],
                out["choice_logp"])


# ------------------------------------------------------------- shared pieces


def regions_of(features, dtype):
    """The feature grid ``(B, H, W, D)`` as ``(B, H*W, D)`` regions."""
    return features.reshape(features.shape[0], -1, features.shape[-1]).astype(dtype)


def lstm_update(gates, c_prev, dtype):
    """An LSTM cell from its pre-activation gates ``(B, 4H)`` (i, f, g, o), in float32.

    Returns ``(h, c, (i, f, g, o, tanh_c))``; the last part is what a hand-written
    backward pass needs.
    """
    i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c = f * c_prev + i * g
    tanh_c = jnp.tanh(c)
    return (o * tanh_c).astype(dtype), c, (i, f, g, o, tanh_c)


def doubly_stochastic_penalty(alphas, mask, weights, alpha_c: float) -> dict:
    """Show, Attend and Tell's penalty: every region should get about one unit of
    attention over the caption's words, ``alpha_c * mean_p (1 - sum_t alpha_tp)^2``."""
    if not alpha_c:
        return {}
    mass = jnp.einsum("btp,bt->bp", alphas, (mask > 0).astype(alphas.dtype))
    penalty = jnp.sum(weights * jnp.mean((1.0 - mass) ** 2, axis=-1))
    return {"penalty": (alpha_c * penalty, "example")}
