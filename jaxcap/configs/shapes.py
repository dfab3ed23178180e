"""The embedded default: the synthetic shapes dataset, no download, minutes on a CPU."""

import ml_collections

from jaxcap.configs.common import base_config


def get_config():
    c = base_config()
    c.dataset.name = "shapes"
    c.dataset.shapes = ml_collections.ConfigDict(dict(
        seed=0, image_size=128, num_train=6000, num_val=500, num_test=500, num_novel=500))
    c.text.min_count = 1
    c.text.max_length = 18
    c.eval.max_length = 18
    c.encoder.init_depth = 18
    c.encoder.stage = 3
    c.encoder.image_size = 128
    c.decoder.hidden_dim = 256
    c.decoder.attention_dim = 256
    c.num_epochs = 10
    c.checkpoint_every_steps = 500
    return c
