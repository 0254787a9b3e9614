"""Another version of one of specdec's modules, loaded beside this checkout's, so that a benchmark
can take the two in turn in one process (a, b, a, b, ...): on this noisy machine a comparison across
processes is mostly noise. The other file imports this checkout's modules for everything else."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch


def load_module(path: str, name: str) -> ModuleType:
    """The module at `path` (for example an older checkout's specdec/speculative.py), as `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def swap_classes(root: torch.nn.Module, module: ModuleType) -> dict[torch.nn.Module, type]:
    """Give every submodule of `root` whose class `module` also defines that class instead; the
    submodules' original classes, to swap back (`restore`). The instances keep their weights."""
    original = {}
    for m in root.modules():
        other = getattr(module, type(m).__name__, None)
        if isinstance(other, type) and other is not type(m):
            original[m] = type(m)
            m.__class__ = other
    return original


def restore(original: dict[torch.nn.Module, type]) -> None:
    for m, cls in original.items():
        m.__class__ = cls
