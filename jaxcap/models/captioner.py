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
images or features in place of the encoder's grid.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxcap.models.decoders import Decoder
from jaxcap.models.preprocessing import normalize
from jaxcap.models.resnet import ResNet


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
