"""splitdiff: split diffusion-model inference across time, space and users."""

__version__ = "0.1.0"
