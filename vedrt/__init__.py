"""vedrt: fast, exact inference for encoder-decoder generation models."""

__version__ = "0.1.0"
