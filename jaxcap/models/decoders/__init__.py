"""Decoder variants by name (``decoder.variant`` in the config).

Adding one is one file beside this one (a ``Decoder`` subclass: ``base.py``
says what it writes) and one entry in ``VARIANTS``. Its fields are filled
from the config: the shared settings (``embed_dim``, ``hidden_dim``,
``attention_dim``, ``dropout``, ``alpha_c``) where the class has such a field,
then its own section ``decoder.<name>`` (keys are its field names; they win
over the shared settings). Their ranges (a variant's ``RULES``) are checked
here, before anything is built, and errors name the config's keys.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxcap.models.decoders.adaptive import AdaptiveAttentionDecoder
from jaxcap.models.decoders.base import Decoder
from jaxcap.models.decoders.hard import HardAttentionDecoder
from jaxcap.models.decoders.show_tell import ShowAndTellDecoder
from jaxcap.models.decoders.soft import SoftAttentionDecoder
from jaxcap.models.decoders.transformer import TransformerDecoder
from jaxcap.models.decoders.updown import UpDownDecoder

VARIANTS: dict[str, type[Decoder]] = {
    "none": ShowAndTellDecoder,
    "soft": SoftAttentionDecoder,
    "hard": HardAttentionDecoder,
    "adaptive": AdaptiveAttentionDecoder,
    "updown": UpDownDecoder,
    "transformer": TransformerDecoder,
}

# config key -> field name of the settings variants share
SHARED = {"embed_dim": "embed_dim", "hidden_dim": "hidden_dim",
          "attention_dim": "attention_dim", "dropout": "dropout_rate", "alpha_c": "alpha_c"}


def make_decoder(decoder_config, vocab_size: int, feature_dim: int,
                 dtype=jnp.float32) -> Decoder:
    """The variant ``decoder_config.variant``, built from the config's ``decoder`` section."""
    name = decoder_config["variant"]
    if name not in VARIANTS:
        raise ValueError(f"unknown decoder variant {name!r}; known: {', '.join(VARIANTS)}")
    variant = VARIANTS[name]
    defaults = {field.name: field.default for field in dataclasses.fields(variant)}
    fields = set(defaults)
    settings = {field: decoder_config[key] for key, field in SHARED.items()
                if field in fields and key in decoder_config}
    own = dict(decoder_config.get(name) or {})
    unknown = sorted(set(own) - fields)
    if unknown:
        raise ValueError(f"decoder.{name} has no setting {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(fields - {'parent', 'name'}))}")
    names = {**{field: f"decoder.{name}.{field}" for field in fields},
             **{field: f"decoder.{key}" for key, field in SHARED.items() if field not in own}}
    given = {**settings, **own}
    variant.check_settings({**defaults, **given}, names)
    return variant(vocab_size=vocab_size, feature_dim=feature_dim, dtype=dtype, **given)
