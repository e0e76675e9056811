"""cnnlab's version, recorded in every run, checkpoint and exported file."""

__version__ = "0.1.0"
