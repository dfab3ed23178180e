"""jaxcap: image captioning in JAX/Flax."""

__version__ = "0.2.0"
