"""The tiny models shipped with the package (``vitdecomp/core/shipped_models/<kind>/``).

Each folder was written by ``vitdecomp synth train <kind> --out ...`` (see its ``tiny_model.json``
for the exact command arguments, the training time and the held-out accuracy) and is read
through the public loading path (:func:`~vitdecomp.core.tiny.load_tiny`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:
    from .model import Model

__all__ = ["SHIPPED", "shipped_path", "load_shipped"]

#: The shipped tiny models: kind -> what it is.
SHIPPED: dict[str, str] = {
    "clip": "tiny open_clip CLIP trained contrastively on captions of the synthetic world",
    "vit": "tiny timm ViT classifier of the main object's shape (supervised; read with text only through CompAlign)",
    "spurious": "tiny timm ViT classifier trained where the class goes with the background 95 % of the time",
    "swin": "tiny timm Swin classifier of the main object's colour (hierarchical: two stages, windowed attention)",
}


def shipped_path(kind: str, root: str | Path | None = None) -> Path:
    """Folder of the shipped tiny model ``kind`` (or under ``root`` instead of the package)."""
    if kind not in SHIPPED:
        raise InputError(f"no shipped tiny model {kind!r}; choose from {', '.join(SHIPPED)}")
    base = Path(root) if root is not None else Path(__file__).resolve().parent / "shipped_models"
    folder = base / kind
    if not (folder / "tiny_model.json").is_file():
        raise InputError(f"{folder} holds no tiny model; train one with `vitdecomp synth train {kind} --out {folder}`")
    return folder


def load_shipped(kind: str, root: str | Path | None = None) -> Model:
    """Load the shipped tiny model ``kind`` as a :class:`~vitdecomp.Model` (offline)."""
    from .tiny import load_tiny

    return load_tiny(shipped_path(kind, root))
