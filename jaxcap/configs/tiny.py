"""A tiny shapes run: 32-pixel images, a ResNet-18 cut at stage 2, a small decoder.

    jaxcap train --config tiny --workdir runs/tiny

Checks that an installation (or a notebook, or a change) works end to end in
about a minute on a CPU; the tests train it. It learns next to nothing (test
BLEU-4 near 0).
"""

from jaxcap.configs import shapes


def get_config():
    c = shapes.get_config()
    c.dataset.shapes.update(image_size=32, num_train=48, num_val=8, num_test=8, num_novel=0)
    c.encoder.image_size = 32
    c.encoder.stage = 2
    c.encoder.extract_batch_size = 16
    c.decoder.hidden_dim = 32
    c.decoder.attention_dim = 16
    c.batch_size = 8
    c.eval.batch_size = 8
    c.num_epochs = 3
    c.scst.from_epoch = -1  # cross-entropy only (the SCST tests switch it on)
    c.warmup_steps = 5
    c.learning_rate = 3e-3
    c.log_every_steps = 1
    c.checkpoint_every_steps = 4
    c.num_threads = 2
    return c
