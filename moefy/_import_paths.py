"""Import paths of the original MoEfy and of moefy 0.1 that no file provides, put in ``sys.modules`` by
``import moefy`` (:func:`register`):

- ``moefy.moefy``: the original MoEfy's ``moefy/moefy.py``, for its README's first line
  ``from moefy.moefy import MoEBlock``. The package attribute ``moefy.moefy`` stays the conversion function: the
  import system finds this module in ``sys.modules`` and so binds nothing on the package. (``import moefy.moefy
  as m`` reads that attribute, so ``m`` is the function; write ``from moefy.moefy import MoEBlock``.) The old
  file's other classes are gone: its ``Hole`` expert is the option ``hole=True``, its ``TopkRouter`` is
  :class:`moefy.routing.Router` with the selection in :mod:`moefy.routing.select`.
- ``moefy.metrics``: moefy 0.1's module of calibration metrics, the module :mod:`moefy.recipes.metrics` itself.

``moefy.utils`` (the original MoEfy's plot functions) and ``moefy.data`` are files.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

from .block import MoEBlock
from .recipes import metrics


def _original_moefy_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "The original MoEfy's module moefy/moefy.py: its MoEBlock is moefy.MoEBlock.")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.MoEBlock, module.__all__ = MoEBlock, ["MoEBlock"]
    return module


def register(package: str) -> None:
    """Put ``<package>.moefy`` and ``<package>.metrics`` in ``sys.modules`` (once; a module already there stays)."""
    sys.modules.setdefault(f"{package}.moefy", _original_moefy_module(f"{package}.moefy"))
    sys.modules.setdefault(f"{package}.metrics", metrics)
