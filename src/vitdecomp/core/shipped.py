"""The tiny models shipped with the package (``vitdecomp/core/shipped_models/<kind>/``).

Each folder was written by ``vitdecomp synth train <kind> --out ...`` (see its ``tiny_model.json``
for the exact command arguments, the training time and the held-out accuracy) and is read
through the public loading path (:func:`~vitdecomp.core.tiny.load_tiny`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from .model import Model

__all__ = ["SHIPPED", "ShippedModel", "shipped_path", "load_shipped", "shipped_models"]

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


@dataclass(frozen=True)
class ShippedModel:
    """One shipped tiny model: its kind, what it is, and the record it was trained with (``tiny_model.json``:
    the training arguments, time and held-out accuracy)."""

    kind: str
    description: str
    record: Mapping[str, Any]

    @property
    def spec(self) -> str:
        """The model spec that loads it (``synth:KIND``)."""
        return f"synth:{self.kind}"

    def accuracy_summary(self) -> str:
        """The recorded held-out accuracy as text: zero-shot accuracy per factor (a CLIP), else the task's
        accuracy and, when recorded, its worst-group accuracy."""
        zero_shot = self.record.get("zero_shot_accuracy")
        if zero_shot:
            return "zero-shot " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(zero_shot.items()))
        text = f"{self.record.get('task', '?')} {self.record.get('accuracy', float('nan')):.2f}"
        worst = (self.record.get("eval") or {}).get("worst_group_accuracy")
        return text if worst is None else text + f" (worst group {worst:.2f})"

    def line(self) -> str:
        """``synth:KIND  what it is; accuracy`` (one line of ``vitdecomp models``)."""
        return f"synth:{self.kind:<9} {self.description}; {self.accuracy_summary()}"


def shipped_models(root: str | Path | None = None) -> list[ShippedModel]:
    """Every shipped tiny model (:data:`SHIPPED` order) with its training record."""
    import json

    return [ShippedModel(kind, what, json.loads((shipped_path(kind, root) / "tiny_model.json").read_text(
        encoding="utf-8"))) for kind, what in SHIPPED.items()]
