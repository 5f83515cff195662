"""Inputs of the store-reading analyses (``align``, ``label``, ``score``, ``ablate``), for the library and the CLI.

A finished store (:func:`open_store`), a fitted CompAlign checked against a store (:func:`open_alignment`),
a class-name file (:func:`read_classes`) and a model's text tower (:func:`text_tower`); the model a store
or an alignment records is rebuilt by :mod:`vitdecomp.store.reopen`. :class:`ModelChoice` carries the CLI's ``--model``,
``--checkpoint`` and ``--no-pretrained`` into the analyses, which load the model only when they need
it (a Python caller passes a loaded :class:`~vitdecomp.core.model.Model` instead, or nothing: the
store's own model).

Nothing here imports torch at module import time.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..errors import InputError

if TYPE_CHECKING:
    from ..core.model import Model
    from ..core.stack import ComponentStack
    from ..store.component_store import ComponentStore
    from .align.maps import CompAlign

__all__ = ["ModelChoice", "StoreLike", "iter_store_batches", "open_alignment", "open_store", "read_classes",
           "resolve_model", "text_tower"]

log = logging.getLogger(__name__)

#: A store, or the path of one (``vitdecomp decompose MODEL DATA --out STORE``).
StoreLike = Union["ComponentStore", str, os.PathLike]


def open_store(store: StoreLike, *, role: str = "store") -> ComponentStore:
    """A finished store (every chunk done): ``store`` itself, checked, or the one at that path
    (:func:`~vitdecomp.store.reopen.open_complete_store`).

    Raises:
        InputError: no store at the path, or chunks missing.
    """
    from ..store.component_store import ComponentStore
    from ..store.reopen import open_complete_store

    if not isinstance(store, ComponentStore):
        return open_complete_store(Path(store), role=role)
    if not store.is_complete():
        raise InputError(f"{role} {store.path} is not complete ({len(store.done_chunks())}/{store.n_chunks} "
                         "chunks); finish it with the same `vitdecomp decompose` command first")
    return store


def read_classes(path: str | os.PathLike) -> list[str]:
    """Class names of a file: one per line (line ``k`` names target ``k``), blank lines and ``#`` comments
    skipped; repeats are an error.

    Raises:
        InputError: missing or unreadable file, no names, or a name given twice.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"class file {path} does not exist (one class name per line, line i = target i)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read class file {path}: {exc}") from exc
    names = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not names:
        raise InputError(f"class file {path} holds no class names")
    repeats = sorted({n for n in names if names.count(n) > 1})
    if repeats:
        raise InputError(f"class file {path} repeats {repeats[:5]}: each line must be one distinct class")
    return names


@dataclass(frozen=True)
class ModelChoice:
    """Which model an analysis loads when it needs one (the CLI's ``--model``, ``--checkpoint``,
    ``--no-pretrained``); the default is the store's (or the alignment's) recorded model.

    Attributes:
        spec: model spec overriding the record (must name the same model for a store).
        checkpoint: local weights file (the one the store was decomposed with).
        pretrained: ``False`` for random weights; None follows the record.
        device: torch device.
    """

    spec: str | None = None
    checkpoint: Path | None = None
    pretrained: bool | None = None
    device: str | None = None

    def for_store(self, store: ComponentStore) -> Model:
        """The store's model with these choices (:func:`~vitdecomp.store.reopen.load_store_model`)."""
        from ..store.reopen import load_store_model

        return load_store_model(store, self.spec, self.checkpoint, pretrained=self.pretrained, device=self.device)

    def for_alignment(self, align: CompAlign) -> Model:
        """The alignment's CLIP with these choices (:func:`~vitdecomp.store.reopen.load_alignment_clip`)."""
        from ..store.reopen import load_alignment_clip

        return load_alignment_clip(align, self.spec, checkpoint=self.checkpoint, pretrained=self.pretrained,
                                   device=self.device)


def resolve_model(model: Model | ModelChoice | None, store: ComponentStore) -> Model:
    """``model`` itself when loaded; else the store's model as ``model`` (a :class:`ModelChoice`) says."""
    if model is None:
        return ModelChoice().for_store(store)
    if isinstance(model, ModelChoice):
        return model.for_store(store)
    return model


def text_tower(model: Model, *, hint: str) -> Any:
    """The model's text encoder; a model without one is bad input here (``hint`` says what to do).

    Raises:
        InputError: the model has no text tower.
    """
    from ..errors import UnsupportedModelError
    from .text import text_encoder

    try:
        return text_encoder(model)
    except UnsupportedModelError as exc:
        raise InputError(f"{model.name} has no text tower: {hint}") from exc


def open_alignment(align: CompAlign | str | os.PathLike, store: ComponentStore) -> CompAlign:
    """A fitted CompAlign checked against ``store``: same model and weights, components and width.

    Args:
        align: the maps, their ``.safetensors`` file, or the folder ``vitdecomp align --out DIR`` wrote
            (:func:`~vitdecomp.interpret.align.find_alignment`); a file read here is recorded in
            ``meta["file"]``.
        store: the store whose components are mapped.

    Raises:
        InputError: unreadable maps, or maps fitted for another model or other components.
    """
    from .align.maps import CompAlign, find_alignment

    if isinstance(align, CompAlign):
        maps, where = align, str(align.meta.get("file", "the alignment"))
    else:
        file = find_alignment(align)
        maps, where = CompAlign.load(file), str(file)
        maps.meta["file"] = str(file)
    fitted = (maps.meta.get("model"), maps.meta.get("weights"))
    if fitted[0] is not None and fitted != (store.config.model, store.config.weights):
        raise InputError(f"{where} was fitted on a store of {fitted[0]} ({fitted[1]}); {store.path} is of "
                         f"{store.config.model} ({store.config.weights})")
    if maps.d_model != store.comp_shape[-1] or maps.n_components != len(store.labels):
        raise InputError(f"{where} maps {maps.n_components} components of width {maps.d_model}; {store.path} has "
                         f"{len(store.labels)} of width {store.comp_shape[-1]}")
    if maps.labels is not None and tuple(maps.labels) != tuple(store.labels):
        raise InputError(f"{where} was fitted for other components than those of {store.path}")
    return maps


def iter_store_batches(store: ComponentStore, *, desc: str, progress: bool = False,
                       chunks: Sequence[int] | None = None) -> Iterator[ComponentStack]:
    """``store.iter_batches(chunks=chunks)`` (one chunk at a time), with a tqdm bar in items on stderr when
    ``progress``."""
    from ..store.dataset_run import progress_bar

    bar = progress_bar(store.n_items, enabled=progress, desc=desc)
    try:
        for stack in store.iter_batches(chunks=None if chunks is None else list(chunks)):
            yield stack
            bar.update(stack.batch_size)
    finally:
        bar.close()
