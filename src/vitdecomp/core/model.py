"""``Model``: a stock module, the adapter that reads it, and its own preprocessing.

``vd.load(...)`` (:mod:`vitdecomp.core.loading`) builds the module with its library's own
factory; ``vd.wrap(module)`` takes a module the user already built. Either way the module is not modified: the
adapter only reads it, and hooks live for one forward pass.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters.base import Adapter, Preprocessing, ViTMap, adapter_for
from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Model", "wrap", "load_checkpoint", "weights_digest", "weights_unavailable", "hub_offline",
           "WeightsUnavailableError"]

log = logging.getLogger(__name__)

class WeightsUnavailableError(InputError):
    """Pretrained weights could not be found (offline, no cache, no checkpoint)."""


class Model:
    """A stock vision model that vitdecomp can decompose.

    Attributes:
        module: the unmodified timm / open_clip / transformers module.
        adapter: the family adapter reading it.
        name: a readable name (the load spec when loaded by :func:`load`).
        weights: what the weights are: ``"pretrained:<tag>"``, ``"checkpoint:<sha256>"``,
            ``"random-init"`` or ``"unknown"`` (wrapped modules); part of store keys.
        extras: family-specific objects (e.g. the full CLIP model for its text tower).
    """

    def __init__(
        self,
        module: nn.Module,
        adapter: Adapter | None = None,
        *,
        name: str | None = None,
        weights: str = "unknown",
        preprocessing: Preprocessing | None = None,
        transform: Callable[[Any], torch.Tensor] | None = None,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.module = module
        self.adapter = adapter if adapter is not None else adapter_for(module)
        self.name = name or type(module).__name__
        self.weights = weights
        self._preprocessing = preprocessing
        self._transform = transform
        self.extras: dict[str, Any] = dict(extras or {})

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def vit_map(self) -> ViTMap:
        """The adapter's reading of the module, made afresh on every access.

        Not cached on purpose: it holds tensors derived from the live parameters
        (e.g. ``W_out * gamma``), which would go stale after a dtype cast or a weight update.
        Reading is cheap (views and one product per block). Raises UnsupportedModelError.
        """
        return self.adapter.vit_map(self.module)

    @property
    def structure(self) -> Any:
        """The adapter's structure map for the engine (``ViTMap`` for isotropic ViTs), made afresh."""
        read = getattr(self.adapter, "structure", None)
        return read(self.module) if read is not None else self.adapter.vit_map(self.module)

    @property
    def preprocessing(self) -> Preprocessing:
        if self._preprocessing is None:
            self._preprocessing = self.adapter.preprocessing(self.module)
        return self._preprocessing

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> ``[3, H, W]`` tensor, the library's own eval transform when it has one."""
        if self._transform is None:
            self._transform = build_transform(self.preprocessing)
        return self._transform

    @property
    def n_layers(self) -> int:
        return len(self.structure.blocks)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def representation(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's own representation ``[batch, d_z]`` (no hooks)."""
        import torch

        with torch.no_grad():
            return self.structure.forward(pixels)

    def classifier(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(W ``[classes, d_z]``, b) with ``logits = representation @ W.T + b``, if any."""
        return self.adapter.classifier(self.module)

    def example_input(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Random normalised pixels of the model's input size (for tests and docs)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        h, w = self.preprocessing.input_size
        x = torch.randn(batch, 3, h, w, generator=gen)
        return x.to(device=self.device, dtype=self.dtype)

    def to(self, *args: Any, **kwargs: Any) -> Model:
        self.module.to(*args, **kwargs)
        return self

    def describe(self) -> dict[str, Any]:
        """Facts about the model for tables and manifests."""
        structure = self.structure
        own = getattr(structure, "describe", None)
        if callable(own):  # structures other than ViTMap (e.g. Swin) describe themselves
            facts = {"name": self.name, "family": self.family, "weights": self.weights}
            facts.update(own())
            facts["input_size"] = list(self.preprocessing.input_size)
            return facts
        vm = structure
        ro = vm.readout
        return {
            "name": self.name,
            "family": self.family,
            "weights": self.weights,
            "blocks": len(vm.blocks),
            "heads": vm.blocks[0].attn.n_heads,
            "width": int(vm.blocks[0].attn.w_out.shape[-1]),
            "prefix_tokens": list(vm.prefix_types),
            "pool": ro.pool,
            "token_norm": ro.token_norm.kind if ro.token_norm else None,
            "pooled_norm": ro.pooled_norm.kind if ro.pooled_norm else None,
            "projection": tuple(ro.proj.shape) if ro.proj is not None else None,
            "input_size": list(self.preprocessing.input_size),
        }

    def __repr__(self) -> str:
        return f"Model({self.name!r}, family={self.family!r}, weights={self.weights!r})"


def build_transform(prep: Preprocessing) -> Callable[[Any], torch.Tensor]:
    """An eval transform from a :class:`Preprocessing` (resize, centre crop, normalise)."""
    from torchvision import transforms as T

    interp = {
        "bicubic": T.InterpolationMode.BICUBIC,
        "bilinear": T.InterpolationMode.BILINEAR,
        "nearest": T.InterpolationMode.NEAREST,
    }.get(prep.interpolation, T.InterpolationMode.BICUBIC)
    h, w = prep.input_size
    if prep.resize_mode == "squash":
        resize: list[Any] = [T.Resize((h, w), interpolation=interp)]
    else:
        scale = int(round(min(h, w) / prep.crop_pct))
        resize = [T.Resize(scale, interpolation=interp), T.CenterCrop((h, w))]
    return T.Compose(
        [*resize, T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(prep.mean, prep.std)]
    )


def wrap(module: Any, *, name: str | None = None) -> Model:
    """Wrap an already-built stock module (timm, open_clip or transformers).

    Raises:
        UnsupportedModelError: no adapter reads this module exactly (the message says why).
    """
    if isinstance(module, Model):
        return module
    model = Model(module, name=name)
    model.structure  # noqa: B018  (read now so unsupported modules fail here, not later)
    return model


def weights_unavailable(spec: str, exc: BaseException) -> WeightsUnavailableError:
    """The one-line error raised when a library could not get pretrained weights.

    The library's own message is cut to its first line (hub errors run over several), and the
    fixes are named: download once online, ``--checkpoint FILE``, or ``--no-pretrained``.
    """
    detail = " ".join(str(exc).split())
    if len(detail) > 160:
        detail = detail[:157] + "..."
    where = "HF_HUB_OFFLINE is set" if hub_offline() else "no network or no cached copy"
    return WeightsUnavailableError(
        f"pretrained weights for {spec} are not available ({where}; {type(exc).__name__}: {detail}). "
        "Fix: download them once with network (they are cached), pass --checkpoint FILE (checkpoint=FILE), "
        "or use --no-pretrained (pretrained=False) for random weights."
    )


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE``)."""
    import os

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def weights_digest(module: nn.Module) -> str:
    """sha256 (16 hex digits) over every parameter and buffer, by name: the identity of weights
    that have no name (random init, a wrapped module)."""
    import torch

    h = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:limit] if limit else digest.hexdigest()


def load_checkpoint(module: nn.Module, path: Path, *, strict: bool = True) -> str:
    """Load a local ``.safetensors`` or torch checkpoint into ``module``; returns its weights id.

    Torch files are read with ``weights_only=True``. A state dict nested under
    ``state_dict`` / ``model`` / ``module`` keys, or with a ``module.`` prefix (DDP), is unwrapped.

    Raises:
        InputError: unreadable file, or keys/shapes that do not match the architecture.
    """
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not contain a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        result = module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise InputError(f"checkpoint {path} does not fit this architecture: {exc}") from exc
    if not strict and (result.missing_keys or result.unexpected_keys):
        log.warning("checkpoint %s: missing %s, unexpected %s", path, result.missing_keys, result.unexpected_keys)
    return f"checkpoint:{file_sha256(path, 16)}"
