"""Pixel normalisation matching each weight source.

The style is recorded in a converted checkpoint's metadata and read from there;
a user never has to remember which convention a set of weights expects. It
runs inside the jitted model step, so images travel to the device as uint8.
"""

from __future__ import annotations

import jax.numpy as jnp

# Keras/caffe: BGR channel order, ImageNet means subtracted on the 0..255 scale.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision: RGB on 0..1, normalised by ImageNet mean and standard deviation.
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)

STYLES = ("caffe", "torch")


def normalize(images: jnp.ndarray, style: str) -> jnp.ndarray:
    """Maps RGB images (NHWC, values 0..255, any dtype) to the network's input."""
    images = images.astype(jnp.float32)
    if style == "caffe":
        return images[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
    if style == "torch":
        mean = jnp.asarray(TORCH_MEAN_RGB, jnp.float32)
        std = jnp.asarray(TORCH_STD_RGB, jnp.float32)
        return (images / 255.0 - mean) / std
    raise ValueError(f"unknown preprocessing style {style!r}; expected one of {STYLES}")
