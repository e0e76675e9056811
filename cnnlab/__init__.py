"""cnnlab: image-classification experiments on PyTorch, done right."""

__version__ = "0.1.0"
