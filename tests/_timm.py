"""``import timm`` for the tests, where PyPI's torchvision cannot load.

timm imports torchvision at package import (for model layers and data transforms), but its
optimizer factory never uses it. PyPI's torchvision wheels are CUDA builds that fail to import
beside the CPU build of torch these tests run on ("operator torchvision::nms does not exist").
Where torchvision does not import, :func:`import_timm` imports timm with placeholder
``torchvision`` modules whose attributes are empty classes, then removes the placeholders from
``sys.modules``: ``timm.optim`` is timm's real code. Tests skip when timm is not installed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

import pytest


class _Placeholder(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _PlaceholderModule(types.ModuleType):
    __path__: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _PlaceholderModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _torchvision_imports() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or the RuntimeError of a CUDA build beside CPU torch
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        return False
    return True


def import_timm() -> types.ModuleType:
    """``timm`` with ``timm.optim`` imported (skips the test if timm is not installed)."""
    if "timm.optim" in sys.modules:
        return sys.modules["timm"]
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed")
    if _torchvision_imports():
        importlib.import_module("timm.optim")
        return sys.modules["timm"]
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        importlib.import_module("timm.optim")
    finally:
        sys.meta_path.remove(finder)
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    return sys.modules["timm"]
