"""The seed's setup: ResNet-50 features, GloVe 50d, batch 32, 50 epochs, Adam, Flickr8k.

    jaxcap convert --download keras weights/keras
    jaxcap train --config flickr8k --workdir runs/f8k \
        --config.encoder.weights=weights/keras --config.dataset.manual_dir=~/data/Flickr8k

Not yet run to the end (no Flickr8k or ImageNet weights where jaxcap is
developed): its pieces are tested on fixtures in the official layouts and on
parity with the reference implementations (docs/reliability.md).
"""

from jaxcap.configs.common import base_config


def get_config():
    return base_config()
