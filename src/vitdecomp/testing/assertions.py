"""Assertions for tests that use vitdecomp (shipped, in the manner of Captum's testing helpers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.stack import ComponentStack

__all__ = ["assert_exact"]


def assert_exact(stack: ComponentStack, rtol: float | None = None) -> None:
    """Assert that the stack sums to its reference within ``rtol`` (default: its own tolerance)."""
    tol = rtol if rtol is not None else float(stack.meta.get("rtol", 1e-5))
    err = stack.error()
    assert err <= tol, f"decomposition error {err:.3g} above tolerance {tol:.1g} ({stack.meta.get('model')})"
