"""Decomposition engines, one per architecture shape.

An adapter returns a structure map (e.g. :class:`~vitdecomp.adapters.base.ViTMap`) whose
``engine`` attribute names the engine that decomposes it. Engines are functions
``fn(structure, pixels, **options) -> ComponentStack`` registered here by name, so a new
architecture family adds an adapter and (if its shape is new) an engine, nothing else.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

__all__ = ["register_engine", "engine_for"]

_ENGINES: dict[str, str | Callable[..., Any]] = {
    "vit": "vitdecomp.engines.vit:decompose_vit",
}


def register_engine(name: str, fn: str | Callable[..., Any]) -> None:
    """Register an engine function (or a lazy ``"module:function"`` path) under ``name``."""
    _ENGINES[name] = fn


def engine_for(name: str) -> Callable[..., Any]:
    """The engine function registered under ``name``."""
    from ..errors import UnsupportedModelError

    target = _ENGINES.get(name)
    if target is None:
        raise UnsupportedModelError(f"no decomposition engine named {name!r}; known: {sorted(_ENGINES)}")
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(import_module(module), attr)
        _ENGINES[name] = target
    return target
