"""Decomposition engines, one per architecture shape.

An adapter returns a structure map (e.g. :class:`~vitdecomp.core.adapters.base.ViTMap`) whose
``engine`` attribute names the engine that decomposes it. Engines are functions
``fn(structure, pixels, **options) -> ComponentStack`` registered here by name, so a new
architecture family adds an adapter and (if its shape is new) an engine, nothing else.
"""
from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

__all__ = ["register_engine", "engine_for", "parts_engine_for"]

_ENGINES: dict[str, str | Callable[..., Any]] = {
    "vit": "vitdecomp.core.engines.vit:decompose_vit",
}


# Optional generators that deliver a decomposition in parts (see vitdecomp.iter_decompose):
# the first next() runs the forward pass and yields None, then each part is a ComponentStack.
_PART_ENGINES: dict[str, str | Callable[..., Any]] = {
    "vit": "vitdecomp.core.engines.vit:decompose_vit_parts",
}


def register_engine(name: str, fn: str | Callable[..., Any], parts: str | Callable[..., Any] | None = None) -> None:
    """Register an engine function (or a lazy ``"module:function"`` path) under ``name``,
    and optionally its part-by-part generator."""
    _ENGINES[name] = fn
    if parts is not None:
        _PART_ENGINES[name] = parts


def _resolve(table: dict[str, str | Callable[..., Any]], name: str) -> Callable[..., Any] | None:
    target = table.get(name)
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(import_module(module), attr)
        table[name] = target
    return target


def parts_engine_for(name: str) -> Callable[..., Any] | None:
    """The part-by-part generator registered for engine ``name``, or None."""
    return _resolve(_PART_ENGINES, name)


def engine_for(name: str) -> Callable[..., Any]:
    """The engine function registered under ``name``."""
    from ...errors import UnsupportedModelError

    target = _resolve(_ENGINES, name)
    if target is None:
        raise UnsupportedModelError(f"no decomposition engine named {name!r}; known: {sorted(_ENGINES)}")
    return target
