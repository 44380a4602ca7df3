"""Take small language models to the edge: load, train, quantize, export, and prove parity."""

__version__ = "0.1.0"
