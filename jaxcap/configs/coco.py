"""COCO with Karpathy's splits (dataset_coco.json beside train2014/ and val2014/).

    jaxcap train --config coco --workdir runs/coco \
        --config.encoder.weights=weights/keras --config.dataset.manual_dir=~/data/coco

Not yet run to the end (no COCO where jaxcap is developed): its reader is
tested on a fixture in Karpathy's layout.
"""

from jaxcap.configs.common import base_config


def get_config():
    c = base_config()
    c.dataset.name = "coco"
    c.num_epochs = 20
    c.checkpoint_every_steps = 2000
    return c
