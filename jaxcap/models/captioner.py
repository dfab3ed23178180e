"""The whole captioner: an optional in-graph ResNet encoder and a decoder variant.

In ``features`` mode the inputs are cached feature grids and the encoder is
absent. In ``end_to_end`` mode the inputs are uint8 images, normalised as the
encoder's weights expect, run through the ResNet, and either fine-tuned or held
fixed (``stop_gradient``, so no backward pass is spent on it). Its BatchNorm
statistics stay frozen (pretrained weights: their ImageNet statistics), or,
with ``train_batchnorm``, training normalises by the batch's statistics and
updates the running ones (an encoder learning from scratch: frozen at their
initial mean 0 and variance 1 they would normalise nothing).

The methods are the decoder protocol's (``jaxcap.models.decoders.base``) with
images or features in place of the encoder's grid. ``build_captioner`` makes the
one a run's config describes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcap.models import precision
from jaxcap.models.decoders import Decoder, make_decoder
from jaxcap.models.encoder import build_encoder
from jaxcap.models.preprocessing import normalize
from jaxcap.models.resnet import ResNet, output_channels


class Captioner(nn.Module):
    decoder: Decoder
    encoder: ResNet | None = None
    preprocessing: str = "torch"
    finetune_encoder: bool = False
    train_batchnorm: bool = False

    def features(self, inputs, train: bool = False):
        if self.encoder is None:
            return inputs
        features = self.encoder(normalize(inputs, self.preprocessing),
                                train=train and self.train_batchnorm)
        return features if self.finetune_encoder else jax.lax.stop_gradient(features)

    def __call__(self, inputs, tokens, train: bool = False, choices=None) -> dict:
        return self.decoder(self.features(inputs, train), tokens, train, choices)

    def start(self, inputs, max_length: int):
        return self.decoder.start(self.features(inputs), max_length)

    def decode_step(self, context, state, tokens):
        return self.decoder.decode_step(context, state, tokens)

    def policy_step(self, context, state, tokens):
        return self.decoder.policy_step(context, state, tokens)

    def losses(self, outputs, token_logp, mask, weights, train: bool) -> dict:
        return self.decoder.losses(outputs, token_logp, mask, weights, train)


ENCODER_MODES = ("features", "end_to_end")
BATCHNORM_MODES = ("frozen", "batch")


def check_encoder_settings(encoder) -> None:
    """A ``ValueError`` naming the config's ``encoder`` setting that is out of its choices."""
    if encoder.batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"encoder.batchnorm must be frozen or batch, got {encoder.batchnorm!r}")
    if encoder.mode not in ENCODER_MODES:
        raise ValueError(f"encoder.mode must be features or end_to_end, got {encoder.mode!r}")
    if encoder.mode == "end_to_end" and encoder.batchnorm == "batch" and not encoder.finetune:
        raise ValueError("encoder.batchnorm=batch trains the encoder's normalisation: "
                         "it needs encoder.finetune=true")


def build_captioner(config, vocab_size: int, encoder_metadata: dict) -> Captioner:
    """The captioner a run's config describes, for an encoder of ``encoder_metadata``; a
    ``ValueError`` names a setting out of its range."""
    dtype = jnp.dtype(config.dtype)
    precision.warn_if_bfloat16_is_slow(dtype)
    feature_dim = output_channels(encoder_metadata["depth"], config.encoder.stage)
    decoder = make_decoder(config.decoder, vocab_size, feature_dim, dtype)
    check_encoder_settings(config.encoder)
    encoder = None
    train_batchnorm = config.encoder.batchnorm == "batch"
    if config.encoder.mode == "end_to_end":
        encoder = build_encoder(encoder_metadata, stage=config.encoder.stage,
                                grid=config.encoder.grid or None, dtype=dtype,
                                batchnorm_axis="batch" if train_batchnorm else None)
    return Captioner(decoder, encoder, encoder_metadata["preprocessing"],
                     finetune_encoder=config.encoder.finetune,
                     train_batchnorm=train_batchnorm and encoder is not None)
