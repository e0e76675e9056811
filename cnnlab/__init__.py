"""cnnlab: image classification on PyTorch, done right. ``import cnnlab`` loads nothing heavy: the
Python calls load the training code when first used."""
from __future__ import annotations

from .version import __version__

__all__ = ["__version__", "lr_find"]


def __getattr__(name: str):
    # a public call loads its module on first use, so that `import cnnlab` (and `cnnlab --help`) stays
    # free of torch; nothing below imports the package itself (__version__ lives in cnnlab.version)
    if name == "lr_find":
        from .lr_finder import lr_find
        return lr_find
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
