"""Scoped forward hooks on native modules.

``hooks(...)`` registers forward (pre-)hooks for the duration of a ``with`` block and
removes every one of them on exit, also when the forward raises. A hook sees the first
tensor a module receives (``"input"``) or returns (``"output"``): HF modules that return
tuples and take keyword arguments are handled the same way as timm/open_clip modules.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["first_tensor", "hooks", "HookSpec"]

HookSpec = tuple["nn.Module", Literal["input", "output"], Callable[["torch.Tensor"], None]]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in a module's args/kwargs/output (tuples, lists, dicts, model outputs)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        if "hidden_states" in obj and isinstance(obj["hidden_states"], torch.Tensor):
            return obj["hidden_states"]
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


@contextmanager
def hooks(specs: Sequence[HookSpec]) -> Iterator[None]:
    """Register ``(module, "input"|"output", fn)`` hooks; ``fn(tensor)`` is called on each pass."""
    handles = []
    try:
        for module, where, fn in specs:
            if where == "input":

                def pre(mod: Any, args: Any, kwargs: Any, fn: Callable[..., None] = fn) -> None:
                    tensor = first_tensor(args) if args else first_tensor(kwargs)
                    if tensor is not None:
                        fn(tensor)

                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:

                def post(mod: Any, args: Any, output: Any, fn: Callable[..., None] = fn) -> None:
                    tensor = first_tensor(output)
                    if tensor is not None:
                        fn(tensor)

                handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()
