"""Argument helpers shared by the model-building commands: ``--model`` / ``--no-pretrained`` /
``--checkpoint`` and how ``--no-pretrained`` maps onto a library call. The commands' work itself
(opening stores, rebuilding their models) lives in :mod:`vitdecomp.store.reopen`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

__all__ = ["add_model_arguments", "pretrained_choice"]

log = logging.getLogger(__name__)


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
