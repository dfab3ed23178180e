"""The whole captioner: an optional in-graph ResNet encoder and the decoder.

In ``features`` mode the inputs are cached feature grids and the encoder is
absent. In ``end_to_end`` mode the inputs are uint8 images, normalised as the
encoder's weights expect, run through the ResNet with its BatchNorm statistics
frozen, and either fine-tuned or held fixed (``stop_gradient``, so no backward
pass is spent on it).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jaxcap.models.decoder import CaptionDecoder
from jaxcap.models.preprocessing import normalize
from jaxcap.models.resnet import ResNet


class Captioner(nn.Module):
    decoder: CaptionDecoder
    encoder: ResNet | None = None
    preprocessing: str = "torch"
    finetune_encoder: bool = False

    def features(self, inputs):
        if self.encoder is None:
            return inputs
        features = self.encoder(normalize(inputs, self.preprocessing), train=False)
        return features if self.finetune_encoder else jax.lax.stop_gradient(features)

    def __call__(self, inputs, tokens, train: bool = False):
        return self.decoder(self.features(inputs), tokens, train)

    def start(self, inputs):
        return self.decoder.start(self.features(inputs))

    def decode_step(self, tokens, carry, projected, regions):
        return self.decoder.decode_step(tokens, carry, projected, regions)
