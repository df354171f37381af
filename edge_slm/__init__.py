"""edge-slm: run a small language model on a single-board computer, on the device."""

__version__ = "0.1.0"
