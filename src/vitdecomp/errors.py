"""Typed errors raised by vitdecomp.

Every error a user can act on has its own type, and its message says what to do.
"""
from __future__ import annotations

__all__ = [
    "VitDecompError",
    "UnsupportedModelError",
    "DecompositionError",
    "InputError",
]


class VitDecompError(Exception):
    """Base class of every error vitdecomp raises on purpose."""


class UnsupportedModelError(VitDecompError):
    """The model (or one of its modules) cannot be decomposed exactly.

    Raised instead of returning a number that would be wrong. The message names
    the module and the reason.
    """


class DecompositionError(VitDecompError):
    """A decomposition did not add up to the model's own output within tolerance."""


class InputError(VitDecompError, ValueError):
    """Bad user input: unreadable image, wrong shape, unknown model spec, missing file."""
