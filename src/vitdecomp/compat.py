"""Old module paths (before the layered layout), kept importable for one release.

``import vitdecomp.stack`` still works: it returns the module now at ``vitdecomp.core.stack``
(the very same module object, so patches and isinstance checks agree) and warns once with a
:class:`DeprecationWarning` that names the new path. Removed in the release after next.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

#: old dotted prefix -> new dotted prefix
MOVED: dict[str, str] = {
    "vitdecomp.model": "vitdecomp.core.model",
    "vitdecomp.loading": "vitdecomp.core.loading",
    "vitdecomp.adapters": "vitdecomp.core.adapters",
    "vitdecomp.engines": "vitdecomp.core.engines",
    "vitdecomp.capture": "vitdecomp.core.capture",
    "vitdecomp.readout": "vitdecomp.core.readout",
    "vitdecomp.stack": "vitdecomp.core.stack",
    "vitdecomp.labels": "vitdecomp.core.labels",
    "vitdecomp.decomposition": "vitdecomp.core.decomposition",
    "vitdecomp.dataset_run": "vitdecomp.store.dataset_run",
    "vitdecomp.distributed": "vitdecomp.store.distributed",
    "vitdecomp.provenance": "vitdecomp.store.provenance",
    "vitdecomp.text": "vitdecomp.interpret.text",
    "vitdecomp.align": "vitdecomp.interpret.align",
    "vitdecomp.textspan": "vitdecomp.interpret.textspan",
    "vitdecomp.score": "vitdecomp.interpret.score",
    "vitdecomp.ablate": "vitdecomp.interpret.ablate",
    "vitdecomp.retrieve": "vitdecomp.apps.retrieve",
    "vitdecomp.heatmap": "vitdecomp.apps.heatmap",
    "vitdecomp.debias": "vitdecomp.apps.debias",
    "vitdecomp.segmentation": "vitdecomp.apps.segmentation.metrics",
    "vitdecomp.segment_run": "vitdecomp.apps.segmentation.harness",
    "vitdecomp.relevance": "vitdecomp.apps.segmentation.relevance",
    "vitdecomp.attention_maps": "vitdecomp.apps.segmentation.attention",
    "vitdecomp.demo": "vitdecomp.synth.demo",
    "vitdecomp.synth.tiny": "vitdecomp.core.tiny",
    "vitdecomp.synth.weights": "vitdecomp.core.shipped",
}


def new_name(old: str) -> str | None:
    """Where an old dotted module name lives now, or None if it did not move."""
    for prefix, target in MOVED.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.target}; the old path goes in the release after next",
                      DeprecationWarning, stacklevel=4)
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system re-stamps __spec__ with the alias's; restored below
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module: ModuleType) -> None:  # already executed under its new name
        module.__spec__ = self._spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Resolves old module paths to the moved modules (installed by ``vitdecomp/__init__``)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        moved = new_name(fullname)
        if moved is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(moved))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before the path finder: an old name must never load a file twice
