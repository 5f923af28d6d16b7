"""cav: one-shot motion customization of text-to-video diffusion models (Customize-A-Video)."""

__version__ = "0.1.0"
