"""capjax: a CNN + LSTM image captioner in JAX/Flax (README.md)."""

__version__ = '0.1.0'
