"""Tiny models of the synthetic world: architectures, saving and loading.

* :func:`build_tiny_clip`: an open_clip ``CLIP`` (64 px, patch 8, 4-layer image tower, small
  text tower over open_clip's stock :class:`~open_clip.tokenizer.SimpleTokenizer` vocabulary),
  built with open_clip's own class from :data:`CLIP_CONFIG`, so ``vitdecomp.wrap`` reads it
  with the stock open_clip adapter.
* :func:`build_tiny_vit`: a timm ``VisionTransformer`` (64 px, patch 8, depth 4, CLS pooling)
  from ``timm.create_model("vit_tiny_patch16_224", ...)`` with :data:`VIT_CONFIG`.
* :func:`save_tiny` writes weights (safetensors) and a JSON sidecar (:data:`SIDECAR`) into a
  folder; :func:`load_tiny` rebuilds the architecture from the sidecar, loads the weights
  strictly and returns a wrapped :class:`vitdecomp.Model`. A CLIP folder is also an open_clip
  ``local-dir`` model: ``vd.load("open_clip:local-dir:DIR")`` loads it too.

Training is :mod:`vitdecomp.synth.train`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .model import Model

__all__ = ["CLIP_CONFIG", "VIT_CONFIG", "SWIN_CONFIG", "CLIP_PREPROCESS", "SIDECAR", "FORMAT", "STORAGE_DTYPE", "build_tiny_clip",
           "build_tiny_vit", "sincos_grid", "sincos_position_init", "round_to_storage", "image_stats", "save_tiny",
           "load_tiny", "read_sidecar"]

#: open_clip ``model_cfg`` of the tiny CLIP (``CLIP(**CLIP_CONFIG)``). The text tower keeps the
#: stock 49408-token vocabulary (open_clip's hf-free SimpleTokenizer) but is narrow and shallow.
CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
}
#: open_clip ``preprocess_cfg`` written next to the tiny CLIP (OpenAI mean/std, 64 px).
CLIP_PREPROCESS: dict[str, Any] = {
    "size": 64, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest",
}
#: ``timm.create_model`` arguments of the tiny supervised ViT (``num_classes`` added per task).
VIT_CONFIG: dict[str, Any] = {
    "model_name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "depth": 4, "embed_dim": 128,
    "num_heads": 4, "global_pool": "token",
}
#: ``timm.create_model`` arguments of the tiny Swin classifier (hierarchical: 16x16 patches of 4 px,
#: 4x4 windows, two stages, relative position bias only, so no position initialisation).
SWIN_CONFIG: dict[str, Any] = {
    "model_name": "swin_tiny_patch4_window7_224", "img_size": 64, "patch_size": 4, "window_size": 4,
    "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4),
}
#: File name of the JSON sidecar in a tiny-model folder.
SIDECAR = "tiny_model.json"
FORMAT = {"name": "vitdecomp-tiny-model", "version": 1}
#: Floating-point weights are stored in this dtype (half the size of float32). Trained models are
#: rounded to it (:func:`round_to_storage`) before they are evaluated, so the recorded accuracy
#: is that of the stored weights exactly.
STORAGE_DTYPE = "float16"
_WEIGHTS = {"open_clip": "open_clip_model.safetensors", "timm": "model.safetensors"}


def build_tiny_clip(seed: int = 0, config: dict[str, Any] | None = None) -> nn.Module:
    """An open_clip ``CLIP`` at random init from ``config`` (default :data:`CLIP_CONFIG`), drawn from ``seed``."""
    import torch
    from open_clip.model import CLIP

    cfg = copy.deepcopy(config or CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**cfg)
    sincos_position_init(model.visual.positional_embedding)
    return model


def build_tiny_vit(seed: int = 0, num_classes: int = 8, config: dict[str, Any] | None = None) -> nn.Module:
    """A timm classifier at random init from ``seed``: the ``VisionTransformer`` of :data:`VIT_CONFIG`
    by default, any other ``timm.create_model`` arguments (e.g. :data:`SWIN_CONFIG`) otherwise;
    ``num_classes`` outputs. An absolute position embedding gets the 2-D sin-cos init."""
    import timm
    import torch

    cfg = dict(config or VIT_CONFIG)
    name = cfg.pop("model_name")
    cfg["num_classes"] = int(num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **cfg)
    if getattr(model, "pos_embed", None) is not None:
        sincos_position_init(model.pos_embed)
    return model


#: Amplitude of the 2-D sin-cos position initialisation of the tiny models.
POSITION_AMPLITUDE = 2.0


def sincos_grid(dim: int, grid: int, amplitude: float = POSITION_AMPLITUDE) -> torch.Tensor:
    """2-D sin-cos position codes ``[grid * grid, dim]`` (row-major), ``dim`` divisible by 4.

    Token ``(row y, column x)`` gets ``A * [sin(x w), cos(x w), sin(y w), cos(y w)]`` with
    ``w_j = 10000^(-j / (dim / 4))``, ``j = 0 .. dim/4 - 1`` (the MAE initialisation, scaled by ``A``).
    """
    import torch

    if dim % 4:
        raise ValueError(f"sin-cos position codes need a width divisible by 4, got {dim}")
    q = dim // 4
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    omega = 10000.0 ** (-torch.arange(q, dtype=torch.float64) / q)
    ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    return amplitude * torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)


def sincos_position_init(pos: torch.Tensor, amplitude: float = POSITION_AMPLITUDE) -> None:
    """Overwrite the patch rows of a learned position table with :func:`sincos_grid` codes, in place.

    ``pos`` is ``[1, N, d]`` (timm) or ``[N, d]`` (open_clip); the last ``g * g`` rows are the
    patch grid, any rows before them (CLS) are set to zero. Why: the libraries' default init
    (std 0.02 / ``d^-1/2``) is tiny next to the patch embeddings, and the tiny ViTs then take
    hundreds of steps before they use position at all (measured: no progress on the position
    task in 400 steps; with amplitude 2 the loss breaks away at about 120 steps).
    """
    import math

    import torch

    table = pos.data.view(-1, pos.shape[-1])  # a view: writes reach the module's table
    n = table.shape[0]
    g = math.isqrt(n)
    if g * g != n:
        g = math.isqrt(n - 1)
    if g == 0:
        raise ValueError(f"cannot read a square grid from {n} position rows")
    with torch.no_grad():
        table[: n - g * g].zero_()
        table[n - g * g:] = sincos_grid(table.shape[1], g, amplitude).to(table.dtype)


def round_to_storage(module: nn.Module) -> nn.Module:
    """Round every floating parameter and buffer to :data:`STORAGE_DTYPE` precision, in place
    (values stay in the module's dtype; finite values outside the float16 range raise)."""
    import torch

    dtype = getattr(torch, STORAGE_DTYPE)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if t.is_floating_point():
                rounded = t.to(dtype)
                if (torch.isinf(rounded) & torch.isfinite(t)).any():
                    raise ValueError(f"{name} does not fit in {STORAGE_DTYPE}")
                t.copy_(rounded.to(t.dtype))
    return module


def image_stats(module: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's own preprocessing normalises with (timm ``pretrained_cfg`` or open_clip's)."""
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "mean" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    return tuple(CLIP_PREPROCESS["mean"]), tuple(CLIP_PREPROCESS["std"])


def _library(module: nn.Module) -> str:
    return "open_clip" if hasattr(module, "encode_text") else "timm"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_tiny(module: nn.Module, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Write ``module``'s weights (safetensors) and the sidecar ``info`` (+ architecture) under ``out_dir``.

    Returns the sidecar path. For a CLIP the folder is also an open_clip ``local-dir`` model
    (``open_clip_config.json`` + ``open_clip_model.safetensors``).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    library = _library(module)
    weights = out / _WEIGHTS[library]
    import torch

    dtype = getattr(torch, STORAGE_DTYPE)
    state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    save_file(state, str(weights), metadata={"format": FORMAT["name"]})
    if library == "open_clip":
        arch = info.get("architecture") or CLIP_CONFIG
        config = {"model_cfg": arch, "preprocess_cfg": CLIP_PREPROCESS}
        (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    sidecar = {"format": FORMAT, "library": library, "weights": weights.name, "sha256": _sha256(weights),
               "storage_dtype": STORAGE_DTYPE,
               "n_parameters": int(sum(p.numel() for p in module.parameters())), **info}
    path = out / SIDECAR
    path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_sidecar(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(folder, sidecar dict) of a tiny-model folder, its weights file or its sidecar file."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    sidecar = folder / SIDECAR
    if not sidecar.is_file():
        raise InputError(f"{folder} holds no {SIDECAR}: not a tiny model written by `vitdecomp synth train`")
    info = json.loads(sidecar.read_text(encoding="utf-8"))
    if info.get("format", {}).get("name") != FORMAT["name"]:
        raise InputError(f"{sidecar} is not a {FORMAT['name']} sidecar")
    return folder, info


def load_tiny(path: str | Path) -> Model:
    """Rebuild a tiny model from its sidecar, load its safetensors strictly and wrap it.

    ``path`` is the folder written by :func:`save_tiny` (or a file in it). A CLIP goes through
    ``vd.load("open_clip:local-dir:FOLDER")`` (so it has its tokenizer in ``extras``); a timm
    ViT is rebuilt with ``timm.create_model`` and wrapped with a 64 px ToTensor+Normalize transform.
    The sidecar is in ``model.extras["tiny"]``.
    """
    from safetensors.torch import load_file

    from .adapters.open_clip_vit import load_open_clip
    from .model import Model

    folder, info = read_sidecar(path)
    weights = folder / info["weights"]
    if not weights.is_file():
        raise InputError(f"weights file not found: {weights}")
    if info["library"] == "open_clip":
        model = load_open_clip(f"local-dir:{folder}", pretrained=True)
        model.name = f"open_clip:local-dir:{folder}"
        model.module.eval()
        model.structure  # noqa: B018
    else:
        module = build_tiny_vit(0, info["num_classes"], info.get("architecture"))
        module.load_state_dict(load_file(str(weights)), strict=True)
        module.eval()
        model = Model(module, name=f"tiny:{info.get('kind', 'vit')}:{folder.name}", transform=_transform(module))
        model.structure  # noqa: B018
    model.extras["tiny"] = info
    return model


def _transform(module: nn.Module) -> Any:
    from torchvision import transforms

    mean, std = image_stats(module)
    return transforms.Compose([
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(64, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(64), transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
