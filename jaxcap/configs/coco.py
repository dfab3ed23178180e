"""COCO with Karpathy's splits (dataset_coco.json beside train2014/ and val2014/)."""

from jaxcap.configs.common import base_config


def get_config():
    c = base_config()
    c.dataset.name = "coco"
    c.num_epochs = 20
    c.checkpoint_every_steps = 2000
    return c
