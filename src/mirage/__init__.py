"""mirage: creative work with pixel-space diffusion models."""

__version__ = "0.1.0"
