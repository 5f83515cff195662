"""Helpers shared by the store-reading commands (``score``, ``ablate``): opening a finished store,
loading the model a store was written with, streaming with a progress bar.

Nothing here imports torch at module import time.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.model import Model
    from ..core.stack import ComponentStack
    from ..store.component_store import ComponentStore

__all__ = ["open_complete_store", "add_model_arguments", "pretrained_choice", "load_store_model", "load_alignment_clip", "text_tower",
           "iter_with_progress"]

log = logging.getLogger(__name__)


def open_complete_store(path: Path, *, role: str = "store") -> ComponentStore:
    """Open a store and require every chunk to be done (exit code 2 otherwise):
    :func:`vitdecomp.store.reopen.open_complete_store`."""
    from ..store.reopen import open_complete_store as _open

    return _open(path, role=role)


def add_model_arguments(p: argparse.ArgumentParser, *, required: bool = False, store: bool = True,
                        help_model: str | None = None) -> None:
    """The model options every model-building command shares: ``--model``, ``--no-pretrained``, ``--checkpoint``.

    Args:
        required: ``--model`` must be given (commands that do not read a store).
        store: the command reads a store, whose recorded model is the default.
    """
    default = " (default: the store's own model, rebuilt offline from its record)" if store else ""
    p.add_argument("--model", required=required,
                   help=(help_model or "model spec: timm:NAME | open_clip:ARCH[:TAG] | hf:REPO_OR_PATH | synth:KIND "
                         "(`vitdecomp models`)") + default)
    p.add_argument("--no-pretrained", action="store_true",
                   help="random weights (offline)" + ("; a store records this itself" if store else ""))
    p.add_argument("--checkpoint", type=Path, help="load weights from a local .safetensors / torch file"
                   + (" (the one the store was decomposed with)" if store else ""))


def pretrained_choice(args: argparse.Namespace) -> bool | None:
    """``False`` when ``--no-pretrained`` was given, else None (follow the record)."""
    return False if getattr(args, "no_pretrained", False) else None


def load_store_model(store: ComponentStore, spec: str | None, checkpoint: Path | None = None,
                     *, pretrained: bool | None = None, device: str | None = None) -> Model:
    """The model a store was written with, rebuilt from the store's record (offline-first):
    :func:`vitdecomp.store.reopen.load_store_model`."""
    from ..store.reopen import load_store_model as _load

    return _load(store, spec, checkpoint, pretrained=pretrained, device=device)


def load_alignment_clip(align: Any, spec: str | None, *, checkpoint: Path | None = None,
                        pretrained: bool | None = None, device: str | None = None) -> Model:
    """The CLIP a CompAlign was fitted to, rebuilt from the maps' record:
    :func:`vitdecomp.store.reopen.load_alignment_clip`."""
    from ..store.reopen import load_alignment_clip as _load

    return _load(align, spec, checkpoint=checkpoint, pretrained=pretrained, device=device)


def text_tower(model: Model, *, hint: str) -> Any:
    """The model's text encoder; a model without one is bad input here (``hint`` says what to do)."""
    from ..errors import InputError, UnsupportedModelError
    from ..interpret.text import text_encoder

    try:
        return text_encoder(model)
    except UnsupportedModelError as exc:
        raise InputError(f"{model.name} has no text tower: {hint}") from exc


def iter_with_progress(store: ComponentStore, args: argparse.Namespace, desc: str,
                       chunks: list[int] | None = None) -> Iterator[ComponentStack]:
    """``store.iter_batches()`` with a tqdm bar in items on stderr (none with ``-q``)."""
    from ..store.dataset_run import progress_bar as _progress

    bar = _progress(store.n_items, enabled=not getattr(args, "quiet", False), desc=desc)
    try:
        for stack in store.iter_batches(chunks=chunks):
            yield stack
            bar.update(stack.batch_size)
    finally:
        bar.close()
