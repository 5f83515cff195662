"""``vd.load(spec)``: build a stock model with its own library's loader and wrap it.

Kept apart from :mod:`vitdecomp.model` so that the adapters (which build :class:`Model`
objects) and the loader (which dispatches to the adapters) do not import each other.
"""
from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .model import Model

__all__ = ["load", "SPEC_PREFIXES"]

SPEC_PREFIXES = ("timm", "open_clip", "hf")


def load(
    spec: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    device: str | None = None,
    seed: int = 0,
) -> Model:
    """Build a model with its library's own loader.

    Args:
        spec: ``"timm:NAME"``, ``"open_clip:ARCH[:TAG]"`` or ``"hf:REPO_OR_LOCAL_PATH"``.
        pretrained: fetch the library's pretrained weights (from the local hub cache when
            offline). ``False`` builds the architecture with random weights, offline.
        checkpoint: a local ``.safetensors`` or torch file (loaded with ``weights_only``)
            whose state dict is loaded strictly into the architecture. Implies no download.
        device: move the model there (default: stay on CPU).
        seed: random weights (``pretrained=False`` without a checkpoint) are drawn from this
            seed, without touching the caller's random state, so every process (a resumed
            run, each torchrun rank) builds the same model.

    Raises:
        InputError: malformed spec or unknown model name.
        WeightsUnavailableError: pretrained weights are not in the cache and cannot be fetched.
        UnsupportedModelError: the architecture cannot be decomposed exactly.
    """
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in SPEC_PREFIXES or not rest:
        raise InputError(
            f"model spec {spec!r} is not one of 'timm:NAME', 'open_clip:ARCH[:TAG]', 'hf:REPO_OR_PATH'"
        )
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise InputError(f"checkpoint file not found: {checkpoint}")
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if prefix == "timm":
            from .adapters.timm_vit import load_timm

            model = load_timm(rest, pretrained=pretrained, checkpoint=checkpoint)
        elif prefix == "open_clip":
            from .adapters.open_clip_vit import load_open_clip

            model = load_open_clip(rest, pretrained=pretrained, checkpoint=checkpoint)
        else:
            from .adapters.hf_vit import load_hf

            model = load_hf(rest, pretrained=pretrained, checkpoint=checkpoint)
    model.name = spec
    model.module.eval()
    if device is not None:
        model.to(device)
    model.structure  # noqa: B018
    return model
