"""cnnlab: image classification on PyTorch, done right.

    import cnnlab
    run = cnnlab.train("photos/", model="pool-bn", epochs=10)
    run.metrics["test_accuracy"], run.predict(["cat.jpg"])

``import cnnlab`` loads nothing heavy: the Python calls (api.py) load the training code when first
used, so ``cnnlab --help`` stays free of torch."""
from __future__ import annotations

import sys
import types
from importlib import import_module

from .version import __version__

__all__ = ["__version__", "train", "transfer", "resume", "load", "report", "lr_find", "Run", "Callback",
           "CnnlabError"]

_HOMES = {"lr_find": "lr_finder", "Callback": "callbacks", "CnnlabError": "errors"}
# public calls named as modules of the package are: importing the module cnnlab.train would otherwise
# make cnnlab.train that module (the import system sets the attribute); reach those modules as
# `from cnnlab.train import fit` or importlib.import_module("cnnlab.train")
_SHADOWED = ("train", "transfer", "report")


def _public(name: str):
    # a public name loads its module on first use; nothing below imports the package itself
    # (__version__ lives in cnnlab.version), so this is no import circle
    return getattr(import_module(f".{_HOMES.get(name, 'api')}", __name__), name)


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")
    return _public(name)


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(types.ModuleType):
    """The package, whose public calls keep their names when a module of that name is imported."""


for _name in _SHADOWED:
    setattr(_Package, _name, property(lambda self, name=_name: _public(name), lambda self, module: None))
sys.modules[__name__].__class__ = _Package
