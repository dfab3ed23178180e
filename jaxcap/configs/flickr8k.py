"""The seed's setup: ResNet-50 features, GloVe 50d, batch 32, 50 epochs, Adam, Flickr8k.

Convert ImageNet weights first (``jaxcap convert keras ... weights/keras``) and
pass them: ``--config.encoder.weights=weights/keras``.
"""

from jaxcap.configs.common import base_config


def get_config():
    return base_config()
