"""Token heatmaps: where in the image a set of components writes along a direction (METHOD §6.4).

A token stack (``decompose(..., granularity="head_token")``) splits every component ``i`` by the
source token ``t`` it reads from, ``c_i = sum_t c_{i,t}``. For a direction ``y`` (a unit text
embedding, a class weight, a feature direction) and a set of components ``I``, the heatmap is

    h_t = < y, sum_{i in I} c_{i,t} >                                       one value per token t,

and since every step is linear, ``sum_t h_t = < y, sum_{i in I} c_i >`` exactly: summed over the
patch tokens *and* the prefix tokens (CLS, registers) the map is the components' contribution
to ``y``. With ``I`` = all components it is the model's own ``< y, z >``. The contrastive map
(``contrast=y2``) is ``h_t = < sum_i c_{i,t}, y1 - y2 >``, which equals ``map(y1) - map(y2)``.
The CLIP paper's segmentation map ``<c_t, y_top> - mean_c <c_t, y_c>`` is the contrastive map
with ``y2`` = the mean of the class embeddings.

Patch tokens are laid out on the stack's patch grid (``stack.tokens.grid``, row-major);
prefix tokens (CLS, registers) have no place on the image and are returned beside the map,
as METHOD §2.3 asks: registers can carry global information, so look at them before reading
a patch map. Rows that are not attention heads (``embed``/``rest``, MLPs, biases, readout
constants) are direct writes at the pooled positions only: for a CLS-pooled model they sit
entirely on the CLS token, so the patch map of "all components" is the heads' map.

Example (tiny random CLIP, offline)::

    import torch
    import vitdecomp as vd
    from vitdecomp.heatmap import token_heatmap, render_overlay
    from vitdecomp.synth.tiny import build_tiny_clip

    model = vd.wrap(build_tiny_clip())
    x = model.example_input(batch=1)
    stack = vd.decompose(model, x, granularity="head_token")
    y = torch.nn.functional.normalize(torch.randn(stack.dim), dim=0)
    heat = token_heatmap(stack, y, components=["L03.H00", "L03.H01"])
    heat.patch.shape            # [1, 8, 8]
    heat.upsample(64).shape     # [1, 64, 64]

``render_overlay`` draws a signed map over an image (blue negative, white zero, red positive)
with PIL only.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from .errors import InputError
from .labels import ComponentLabel

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .stack import ComponentStack

__all__ = ["Heatmap", "prefix_names", "render_overlay", "token_heatmap"]

log = logging.getLogger(__name__)

#: A direction: a vector ``[d]`` (or ``[1, d]``) in the stack's space, or, for a stack already
#: projected onto ``k`` directions (``decompose(..., directions=Y)``), the index of a column.
Direction = Union["torch.Tensor", int]


@dataclass(frozen=True)
class Heatmap:
    """A signed token map for a batch of images.

    Attributes:
        patch: ``[batch, gh, gw]``: ``h_t`` of the patch tokens on their grid (row-major).
        prefix: ``{name: [batch]}``: ``h_t`` of every non-patch token, named by
            :func:`prefix_names` (``"cls"``, ``"reg0"``, ``"reg1"``, ...).
        components: canonical labels of the components summed (all rows when None was asked).
    """

    patch: torch.Tensor
    prefix: dict[str, torch.Tensor] = field(default_factory=dict)
    components: tuple[str, ...] = ()

    @property
    def grid(self) -> tuple[int, int]:
        """(gh, gw): the patch grid."""
        return int(self.patch.shape[-2]), int(self.patch.shape[-1])

    def total(self) -> torch.Tensor:
        """``sum_t h_t`` over patch and prefix tokens: ``[batch]``, the components' ``<y, sum_i c_i>``."""
        out = self.patch.sum(dim=(-2, -1))
        for value in self.prefix.values():
            out = out + value
        return out

    def upsample(self, size: int | tuple[int, int]) -> torch.Tensor:
        """The patch map resized to pixels, bilinear with ``align_corners=False``: ``[batch, H, W]``.

        This is the upsampling of Chefer et al.'s segmentation protocol (METHOD §6.5 step 2).

        Args:
            size: ``H`` (square) or ``(H, W)``.
        """
        import torch.nn.functional as F

        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if min(hw) <= 0:
            raise InputError(f"upsample size must be positive, got {size}")
        patch = self.patch
        work = patch if patch.is_floating_point() else patch.float()
        return F.interpolate(work[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]


def prefix_names(types: Sequence[str]) -> list[tuple[int, str]]:
    """``(token index, name)`` of every non-patch token: ``"cls"``, then ``"reg0"``, ``"reg1"``, ...

    A type that occurs once and is ``"cls"`` is named ``"cls"``; every other type is numbered
    within its type (``"reg0"`` even for a single register).
    """
    counts: dict[str, int] = {}
    total = {t: sum(1 for u in types if u == t) for t in set(types)}
    out = []
    for index, kind in enumerate(types):
        if kind == "patch":
            continue
        j = counts.get(kind, 0)
        counts[kind] = j + 1
        name = kind if (kind == "cls" and total[kind] == 1) else f"{kind}{j}"
        out.append((index, name))
    return out


def token_heatmap(
    stack: ComponentStack,
    direction: Direction | None = None,
    *,
    components: Sequence[str | ComponentLabel] | None = None,
    contrast: Direction | None = None,
) -> Heatmap:
    """The token map ``h_t = <y, sum_{i in components} c_{i,t}>`` of a token stack.

    Args:
        stack: a token stack (``granularity="head_token"``): values ``[comp, batch, token, d]``
            with ``stack.tokens`` set.
        direction: ``y``: a vector ``[d]`` or ``[1, d]`` in the stack's space (e.g. a unit
            CLIP text embedding for a stack of a CLIP image tower); or, for a stack already
            projected onto ``k`` directions, the column index; or None for a projected stack
            with a single column.
        components: labels (objects or canonical strings such as ``"L03.H01"``) of the rows to
            sum; default every row, so the map sums to the model's ``<y, z>``.
        contrast: a second direction ``y2`` of the same form: the map becomes
            ``<sum_i c_{i,t}, y - y2>``.

    Returns:
        A :class:`Heatmap`: ``patch [batch, gh, gw]`` and ``prefix {name: [batch]}``, in the
        stack's dtype. ``heat.total()`` equals the components' projection onto ``y`` (or
        ``y - y2``) up to float rounding.

    Raises:
        InputError: not a token stack, no patch grid, a direction of the wrong shape, or
            a label that is not in the stack.
    """
    import torch

    if not stack.has_tokens or stack.tokens is None:
        raise InputError(
            "token_heatmap() needs a token stack: decompose(..., granularity='head_token') "
            f"(got values of shape {tuple(stack.values.shape)})"
        )
    info = stack.tokens
    if info.grid is None:
        raise InputError("this token stack has no patch grid (stack.tokens.grid is None)")
    gh, gw = info.grid
    patch_index = info.patch_index
    if len(patch_index) != gh * gw:
        raise InputError(f"{len(patch_index)} patch tokens do not fill the grid {gh}x{gw}")

    sub = stack
    if components is not None:
        if isinstance(components, (str, ComponentLabel)):
            components = [components]
        if len(components) == 0:
            raise InputError("components is empty; pass None for every component")
        try:
            sub = stack.take(list(components))
        except (KeyError, ValueError) as exc:  # unknown label / malformed label string
            raise InputError(str(exc.args[0]) if exc.args else str(exc)) from None

    values = sub.values  # [C, B, N, k]
    # sum over components first (accumulated in float64), then one contraction with y
    summed = values.sum(dim=0, dtype=torch.float64)  # [B, N, k]
    y = _weights(stack, direction, "direction")
    if contrast is not None:
        y2 = _weights(stack, contrast, "contrast")
        y = y - y2
    heat = (summed @ y.to(device=summed.device)).to(values.dtype)  # [B, N]
    batch = heat.shape[0]
    idx = torch.as_tensor(patch_index, dtype=torch.long, device=heat.device)
    patch = heat.index_select(1, idx).reshape(batch, gh, gw)
    prefix = {name: heat[:, i] for i, name in prefix_names(info.types)}
    return Heatmap(patch=patch, prefix=prefix, components=tuple(sub.names))


def _weights(stack: ComponentStack, direction: Direction | None, what: str) -> torch.Tensor:
    """The contraction vector ``[k]`` (float64) over the stack's last axis for one direction."""
    import torch

    width = stack.dim
    projected = stack.space == "projected"
    if direction is None:
        if projected and width == 1:
            return torch.ones(1, dtype=torch.float64)
        raise InputError(
            f"{what} is required: pass a vector [d] in the stack's space"
            + (f", or a column index of this projected stack (0..{width - 1})" if projected else "")
        )
    if isinstance(direction, (int, np.integer)) and not isinstance(direction, bool):
        if not projected:
            raise InputError(
                f"{what}={direction} is a column index, but the stack is not projected onto directions; "
                "pass a vector [d] instead (or decompose with directions=...)"
            )
        col = int(direction)
        if not -width <= col < width:
            raise InputError(f"{what}={col} is out of range for a stack projected onto {width} directions")
        out = torch.zeros(width, dtype=torch.float64)
        out[col] = 1.0
        return out
    if not isinstance(direction, torch.Tensor):
        try:
            direction = torch.as_tensor(np.asarray(direction))
        except Exception as exc:
            raise InputError(f"{what} must be a tensor [d] or an int, got {type(direction).__name__}") from exc
    vec = direction.detach()
    if vec.dim() == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.dim() != 1 or vec.shape[0] != width:
        raise InputError(
            f"{what} must be a vector [{width}] (or [1, {width}]) matching the stack's last axis, "
            f"got shape {tuple(direction.shape)}"
        )
    return vec.to(dtype=torch.float64, device="cpu")


def render_overlay(
    image: Any,
    heat: Any,
    path: str | Path | None = None,
    *,
    alpha: float = 0.5,
    vmax: float | None = None,
) -> Image.Image:
    """Draw a signed map over an image: blue (negative), white (zero), red (positive).

    The map is scaled symmetrically, ``s = clip(h / vmax, -1, 1)`` with ``vmax = max |h|`` by
    default, coloured ``(1 - s^-, 1 - |s|, 1 - s^+)`` (``s^+ = max(s, 0)``, ``s^- = max(-s, 0)``),
    resized bilinearly to the image's own size when its shape differs, and blended:
    ``out = (1 - alpha) image + alpha colour``.

    Args:
        image: a PIL image, or a ``uint8`` array ``[H, W, 3]`` / ``[H, W]``.
        heat: ``[h, w]`` tensor or array (e.g. ``Heatmap.upsample(...)[b]`` or ``Heatmap.patch[b]``).
        path: where to save the result (format from the suffix); None to only return it.
        alpha: weight of the colour map in the blend, in [0, 1].
        vmax: the value drawn at full saturation; default ``max |h|`` (a zero map is white).

    Returns:
        The RGB overlay at the image's original size.
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    base = _rgb_array(image)  # [H, W, 3] uint8
    height, width = base.shape[:2]
    h = _as_numpy(heat).astype(np.float32)
    if h.ndim == 3 and h.shape[0] == 1:
        h = h[0]
    if h.ndim != 2:
        raise InputError(f"heat must be a 2-D map [h, w], got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise InputError("heat contains NaN or infinite values")
    if h.shape != (height, width):
        h = np.asarray(Image.fromarray(h, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    scale = float(np.abs(h).max()) if vmax is None else float(vmax)
    if scale < 0:
        raise InputError(f"vmax must be positive, got {vmax}")
    s = np.clip(h / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(h)
    pos, neg = np.clip(s, 0, None), np.clip(-s, 0, None)
    colour = np.stack([1.0 - neg, 1.0 - np.abs(s), 1.0 - pos], axis=-1) * 255.0
    out = (1.0 - alpha) * base.astype(np.float32) + alpha * colour
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        result.save(target)
        log.info("render_overlay: wrote %s", target)
    return result


def _as_numpy(value: Any) -> np.ndarray:
    detach = getattr(value, "detach", None)
    if callable(detach):  # a torch tensor
        return np.asarray(detach().cpu().float().numpy())
    return np.asarray(value)


def _rgb_array(image: Any) -> np.ndarray:
    """A PIL image or uint8 array as ``[H, W, 3]`` uint8."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InputError(f"image arrays must be uint8 [H, W, 3] or [H, W], got dtype {arr.dtype}")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr
    if arr.ndim == 3 and arr.shape[-1] == 4:
        return arr[..., :3]
    raise InputError(f"image arrays must be [H, W, 3] or [H, W], got shape {arr.shape}")
