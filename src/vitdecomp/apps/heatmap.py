"""Token heatmaps: where in the image a set of components writes along a direction (docs/method.md §6.4).

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
as docs/method.md §2.3 asks: registers can carry global information, so look at them before reading
a patch map. Rows that are not attention heads (``embed``/``rest``, MLPs, biases, readout
constants) are direct writes at the pooled positions only: for a CLS-pooled model they sit
entirely on the CLS token, so the patch map of "all components" is the heads' map.

Example (tiny random CLIP, offline)::

    import torch
    import vitdecomp as vd
    from vitdecomp.apps.heatmap import token_heatmap, render_overlay
    from vitdecomp.core.tiny import build_tiny_clip

    model = vd.wrap(build_tiny_clip())
    x = model.example_input(batch=1)
    stack = vd.decompose(model, x, granularity="head_token")
    y = torch.nn.functional.normalize(torch.randn(stack.dim), dim=0)
    heat = token_heatmap(stack, y, components=["L03.H00", "L03.H01"])
    heat.patch.shape            # [1, 8, 8]
    heat.upsample(64).shape     # [1, 64, 64]

``render_overlay`` draws a signed map over an image (blue negative, white zero, red positive;
symmetric limits ``[-vmax, vmax]``, so 0 is always white) with numpy and PIL;
:func:`overlay_colormap` is the same colour map for matplotlib colour bars.

**Back to the original image.** A model sees its input after its own preprocessing (resize,
centre crop). :func:`crop_box` reads that geometry from the model's transform and returns a
:class:`CropBox`: where the model input lies on the original image (it may extend past it
when the transform pads). :func:`map_to_original` evaluates the bilinear interpolant of the
token grid at every original pixel centre inside the box, :func:`render_original` draws it at
the original size (or shrunk to a longest side, :func:`fit_overlay`, which bounds memory and
file size) with the pixels the model never saw greyed out, and :func:`render_panel`
(matplotlib) adds a colour bar labelled with the map's units and the prefix tokens' values
beside the map. For models read through
CompAlign, :func:`aligned_directions` pulls CLIP-space directions back through the maps
(``<y, F_i c> = <F_iᵀ y, c>``) so the token stack can be contracted before it is expanded,
and :func:`take_columns` picks each component's own column.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from ..errors import InputError
from ..core.labels import ComponentLabel

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..interpret.align import CompAlign
    from ..core.model import Model
    from ..core.stack import ComponentStack

__all__ = [
    "CropBox",
    "default_start_layer",
    "Heatmap",
    "aligned_directions",
    "crop_box",
    "fit_overlay",
    "map_to_original",
    "prefix_names",
    "render_original",
    "render_overlay",
    "render_panel",
    "panel_figure",
    "panel_label",
    "overlay_colormap",
    "PANEL_LABEL",
    "take_columns",
    "token_heatmap",
]

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

        This is the upsampling of Chefer et al.'s segmentation protocol (docs/method.md §6.5 step 2).

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


def default_start_layer(model: Model) -> int:
    """0, except for Swin: its token decomposition covers the last stage only, so its first block."""
    if model.family == "timm-swin":
        structure = model.structure
        return len(structure.blocks) - len(structure.stages[-1].blocks)
    return 0


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
    out = (1.0 - alpha) * base.astype(np.float32) + alpha * _signed_colour(h, scale)
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")
    if path is not None:
        _save(result, path, "render_overlay")
    return result


def _signed_colour(h: np.ndarray, scale: float) -> np.ndarray:
    """``[..., 3]`` float colours in [0, 255] of ``s = clip(h / scale, -1, 1)``: blue, white, red."""
    s = np.clip(h / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(h, dtype=np.float32)
    pos, neg = np.clip(s, 0, None), np.clip(-s, 0, None)
    return np.stack([1.0 - neg, 1.0 - np.abs(s), 1.0 - pos], axis=-1) * 255.0


def _save(image: Image.Image, path: str | Path, who: str) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)
    log.info("%s: wrote %s", who, target)
    return target


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


# ------------------------------------------------------------------ original-image geometry
@dataclass(frozen=True)
class CropBox:
    """Where the model's input lies on the original image.

    Coordinates are continuous pixels: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``
    and has its centre at ``(j + 0.5, i + 0.5)``. A point ``(u, v)`` of the model input (of size
    ``input_width x input_height``) sits on the original image at

        x = left + u * (right - left) / input_width,     y = top + v * (bottom - top) / input_height.

    The box may reach past the image (``left < 0``, ``right > image_width``) when the
    transform pads; it lies inside it for resize + centre crop.

    Attributes:
        left, top, right, bottom: the model input's edges in original-image pixels.
        image_width, image_height: the original image's size.
        input_width, input_height: the model input's size.
    """

    left: float
    top: float
    right: float
    bottom: float
    image_width: int
    image_height: int
    input_width: int
    input_height: int

    def to_original(self, u: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
        """Model-input coordinates ``(u, v)`` -> original coordinates ``(x, y)`` (arrays)."""
        u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
        x = self.left + u * (self.right - self.left) / self.input_width
        y = self.top + v * (self.bottom - self.top) / self.input_height
        return x, y

    def to_input(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Original coordinates ``(x, y)`` -> model-input coordinates ``(u, v)`` (arrays)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        u = (x - self.left) * self.input_width / (self.right - self.left)
        v = (y - self.top) * self.input_height / (self.bottom - self.top)
        return u, v

    def inside(self) -> np.ndarray:
        """``[image_height, image_width]`` bool: original pixels whose centre the model saw."""
        u, v = self.to_input(np.arange(self.image_width) + 0.5, np.arange(self.image_height) + 0.5)
        in_x = (u >= 0) & (u < self.input_width)
        in_y = (v >= 0) & (v < self.input_height)
        return in_y[:, None] & in_x[None, :]

    def resized(self, width: int, height: int) -> CropBox:
        """The same box on the original image resized to ``width x height`` (coordinates scale with
        the image: a point ``x`` of the original is ``x * width / image_width`` on the resized one)."""
        if width <= 0 or height <= 0:
            raise InputError(f"image size must be positive, got {(width, height)}")
        sx, sy = width / self.image_width, height / self.image_height
        return replace(self, left=self.left * sx, top=self.top * sy, right=self.right * sx,
                       bottom=self.bottom * sy, image_width=int(width), image_height=int(height))

    def to_json(self) -> dict[str, Any]:
        return {
            "left": self.left, "top": self.top, "right": self.right, "bottom": self.bottom,
            "image_size": [self.image_width, self.image_height],
            "input_size": [self.input_height, self.input_width],
        }


#: Transforms that do not move pixels (class names of torchvision v1/v2, timm and open_clip).
_NON_GEOMETRIC = frozenset({
    "ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor", "ToImage", "ToPureTensor", "ToDtype",
    "ConvertImageDtype", "Normalize", "Lambda", "MaybeConvertMode", "Grayscale", "ToNumpy", "function",
    "builtin_function_or_method", "partial", "ConvertImageMode",
})


def crop_box(preprocess: Any, image_size: tuple[int, int]) -> CropBox:
    """The model input's box on an original image of ``image_size = (width, height)``.

    Follows the geometric steps of the model's own preprocessing, in order: torchvision
    ``Resize`` (an int or one-element size resizes the shorter side, as torchvision does,
    honouring ``max_size``; a pair ``(h, w)`` squashes), ``CenterCrop`` / ``CenterCropOrPad``
    (pads symmetrically when the crop is larger, then crops at
    ``round((size - crop) / 2)``), timm / open_clip ``ResizeKeepRatio``. Steps that do not move
    pixels (``ToTensor``, ``Normalize``, colour conversions, ``Lambda``) are skipped. Each resize
    scales coordinates by ``old / new`` and each crop shifts them by its offset, so the box is
    exact for these transforms.

    Args:
        preprocess: a :class:`~vitdecomp.core.model.Model` (its ``transform``), a torchvision-style
            ``Compose`` (anything with ``.transforms``), one transform, or a
            :class:`~vitdecomp.core.adapters.base.Preprocessing` (read the way
            :func:`~vitdecomp.core.model.build_transform` builds it).
        image_size: ``(width, height)`` of the original image (PIL's ``image.size``).

    Raises:
        InputError: a random geometric step (training augmentation), or a bad size.

    Unknown steps are assumed not to move pixels (logged); compare the box's input size with
    the transform's actual output (the CLI does) to catch one that does.
    """
    from ..core.adapters.base import Preprocessing

    width, height = int(image_size[0]), int(image_size[1])
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {image_size}")
    transform = preprocess if isinstance(preprocess, Preprocessing) else getattr(preprocess, "transform", preprocess)
    steps = _preprocessing_steps(transform) if isinstance(transform, Preprocessing) else _flatten(transform)
    ax = ay = 0.0
    sx = sy = 1.0
    w, h = width, height
    for step in steps:
        kind = step[0]
        if kind == "resize":
            nh, nw = _resized(step[1], step[2], h, w)
            sx, sy, w, h = sx * w / nw, sy * h / nh, nw, nh
        elif kind == "keep_ratio":
            th, tw = step[1]
            ratio_h, ratio_w = h / th, w / tw
            longest = step[2]
            ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
            nh, nw = round(h / ratio), round(w / ratio)
            sx, sy, w, h = sx * w / nw, sy * h / nh, nw, nh
        else:  # centre crop (or pad)
            ch, cw = step[1]
            pad_l = (cw - w) // 2 if cw > w else 0
            pad_t = (ch - h) // 2 if ch > h else 0
            if cw > w or ch > h:
                ax, ay = ax - sx * pad_l, ay - sy * pad_t
                w = w + max(cw - w, 0)
                h = h + max(ch - h, 0)
            left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
            ax, ay, w, h = ax + sx * left, ay + sy * top, cw, ch
    return CropBox(left=ax, top=ay, right=ax + sx * w, bottom=ay + sy * h, image_width=width,
                   image_height=height, input_width=w, input_height=h)


def _preprocessing_steps(prep: Any) -> list[tuple[Any, ...]]:
    """The geometric steps :func:`vitdecomp.core.model.build_transform` makes from a Preprocessing."""
    h, w = prep.input_size
    if prep.resize_mode == "squash":
        return [("resize", (h, w), None)]
    return [("resize", int(round(min(h, w) / prep.crop_pct)), None), ("crop", (h, w))]


def _flatten(transform: Any) -> list[tuple[Any, ...]]:
    """Geometric steps of a (nested) transform pipeline."""
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        return [step for t in inner for step in _flatten(t)]
    name = type(transform).__name__
    if name == "Resize":
        return [("resize", getattr(transform, "size", None), getattr(transform, "max_size", None))]
    if name in ("CenterCrop", "CenterCropOrPad"):
        size = transform.size
        size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)
        return [("crop", size if len(size) == 2 else (size[0], size[0]))]
    if name == "ResizeKeepRatio":
        if getattr(transform, "random_scale_prob", 0) or getattr(transform, "random_aspect_prob", 0):
            raise InputError(f"{transform!r} is random (training augmentation); heatmaps need the eval transform")
        return [("keep_ratio", tuple(int(v) for v in transform.size), float(transform.longest))]
    if name.startswith("Random"):
        raise InputError(f"{name} is random (training augmentation); heatmaps need the eval transform")
    if name not in _NON_GEOMETRIC:
        log.warning("crop_box: assuming the preprocessing step %s does not move pixels", name)
    return []


def _resized(size: Any, max_size: int | None, h: int, w: int) -> tuple[int, int]:
    """(new_h, new_w) of torchvision's ``resize`` (``_compute_resized_output_size``)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (w, h) if w <= h else (h, w)
    if size is None:  # v2: only max_size
        if max_size is None:
            raise InputError("a Resize with neither size nor max_size")
        new_short, new_long = int(max_size * short / long), int(max_size)
    else:
        requested = int(size[0]) if isinstance(size, (list, tuple)) else int(size)
        new_short, new_long = requested, int(requested * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), int(max_size)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def _interp_matrix(coords: np.ndarray, n: int) -> np.ndarray:
    """``[len(coords), n]`` linear-interpolation weights at grid coordinates ``coords`` (clamped
    to ``[0, n - 1]``, as bilinear resizing with ``align_corners=False`` clamps)."""
    out = np.zeros((len(coords), n), dtype=np.float64)
    if n == 1:
        out[:, 0] = 1.0
        return out
    g = np.clip(coords, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(g).astype(np.int64), n - 2)
    t = g - i0
    rows = np.arange(len(coords))
    out[rows, i0] = 1.0 - t
    out[rows, i0 + 1] = t
    return out


def map_to_original(patch: Any, box: CropBox) -> tuple[np.ndarray, np.ndarray]:
    """A token grid evaluated at every pixel centre of the original image.

    The value at original pixel ``(i, j)`` is the bilinear interpolant of the grid ``[gh, gw]``
    (grid coordinates ``g = u * gw / input_width - 0.5``, clamped, as in
    :meth:`Heatmap.upsample`) at the model-input point ``(u, v)`` of the pixel's centre. For a
    box equal to the model input this *is* ``Heatmap.upsample(input size)``. It is separable:
    ``values = R_y · patch · R_xᵀ`` with ``R_y [H, gh]``, ``R_x [W, gw]`` the interpolation weights.

    Args:
        patch: ``[gh, gw]`` tensor or array (e.g. ``Heatmap.patch[b]``).
        box: from :func:`crop_box`.

    Returns:
        ``(values [H, W] float64, inside [H, W] bool)``; ``inside`` marks the pixels the model saw
        (values outside are the clamped border values and mean nothing).
    """
    grid = _as_numpy(patch).astype(np.float64)
    if grid.ndim == 3 and grid.shape[0] == 1:
        grid = grid[0]
    if grid.ndim != 2:
        raise InputError(f"patch must be a grid [gh, gw], got shape {grid.shape}")
    gh, gw = grid.shape
    u, v = box.to_input(np.arange(box.image_width) + 0.5, np.arange(box.image_height) + 0.5)
    rx = _interp_matrix(u * gw / box.input_width - 0.5, gw)
    ry = _interp_matrix(v * gh / box.input_height - 0.5, gh)
    return ry @ grid @ rx.T, box.inside()


def fit_overlay(image: Any, box: CropBox, max_side: int | None) -> tuple[Image.Image, CropBox]:
    """The image shrunk (never enlarged) so that its longest side is at most ``max_side``, and the
    box on the shrunk image (:meth:`CropBox.resized`); unchanged when it already fits or
    ``max_side`` is None. Drawing on the shrunk image bounds the memory and the file size of an
    overlay whatever the size of the original; the geometry (the inverse of the model's
    resize/crop) is the same.

    Args:
        image: the original image (PIL or uint8 array) of the box's size.
        box: from :func:`crop_box` for the original size.
        max_side: longest side of the result in pixels (>= 1), or None.
    """
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(_rgb_array(image).astype(np.uint8))
    if pil.size != (box.image_width, box.image_height):
        raise InputError(f"image is {pil.size[0]}x{pil.size[1]} but the crop box was made for "
                         f"{box.image_width}x{box.image_height}")
    if max_side is None or max(pil.size) <= max_side:
        return pil, box
    if max_side < 1:
        raise InputError(f"max_side must be at least 1, got {max_side}")
    scale = max_side / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    log.info("overlay drawn at %dx%d (the image is %dx%d; longest side limited to %d px)",
             size[0], size[1], pil.width, pil.height, max_side)
    small = pil.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return small, box.resized(*size)


def render_original(
    image: Any,
    patch: Any,
    box: CropBox,
    path: str | Path | None = None,
    *,
    alpha: float = 0.5,
    vmax: float | None = None,
    max_side: int | None = None,
) -> Image.Image:
    """Draw a token grid over the original image, at the original size (or shrunk to ``max_side``).

    Inside the box the colours are those of :func:`render_overlay` (blue negative, white zero,
    red positive, ``s = clip(h / vmax, -1, 1)``) blended with weight ``alpha`` over the
    image; the pixels the model never saw (cropped away) are drawn in flat grey
    (``0.4 · luminance + 77``, no colour), so what the map covers is visible.

    Args:
        image: the original image (PIL or uint8 array) of the box's size.
        patch: ``[gh, gw]`` token grid.
        box: from :func:`crop_box` for this image's size.
        path: where to save it; None to only return it.
        alpha: weight of the colour map, in [0, 1].
        vmax: value drawn at full saturation; default ``max |patch|``.
        max_side: draw on the image shrunk so that its longest side is at most this
            (:func:`fit_overlay`); None: the original size.

    Returns:
        RGB image of the original size (or of the shrunk size).
    """
    from PIL import Image

    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    if max_side is not None:
        image, box = fit_overlay(image, box, max_side)
    base = _rgb_array(image)
    if base.shape[:2] != (box.image_height, box.image_width):
        raise InputError(
            f"image is {base.shape[1]}x{base.shape[0]} but the crop box was made for "
            f"{box.image_width}x{box.image_height}")
    values, inside = map_to_original(patch, box)
    if not np.all(np.isfinite(values)):
        raise InputError("the token map contains NaN or infinite values")
    scale = float(np.abs(_as_numpy(patch)).max()) if vmax is None else float(vmax)
    if scale < 0:
        raise InputError(f"vmax must be positive, got {vmax}")
    rgb = base.astype(np.float32)
    out = (1.0 - alpha) * rgb + alpha * _signed_colour(values, scale)
    grey = 0.4 * (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)) + 77.0
    out = np.where(inside[..., None], out, grey[..., None])
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")
    if path is not None:
        _save(result, path, "render_original")
    return result


#: Default colour-bar label of :func:`render_panel`: what a token map's values are.
PANEL_LABEL = "contribution of each token to <y, z>"


def panel_label(direction: dict[str, Any]) -> str:
    """The colour-bar label of a map, with its units, from a direction record (``{"kind": "class" | "text",
    "contrast_index" | "contrast": ... }``, as ``vitdecomp heatmap`` records it in ``heatmaps.json``).

    A class direction is a row ``w_c`` of the classifier, so the map is in logit units (a logit
    difference with a contrast class); a text direction is a unit text embedding ``y``, so the
    map is in the units of the representation ``z`` (``<y1 - y2, z>`` with a contrast text).
    """
    if direction.get("kind") == "class":
        if direction.get("contrast_index") is not None:
            return "contribution to the logit difference (logit units)"
        return "contribution to the logit (logit units)"
    if direction.get("contrast") is not None:
        return "contribution to <y1 - y2, z> (y: unit text embeddings)"
    return "contribution to <y, z> (y: unit text embedding)"


def overlay_colormap(signed: bool = True) -> Any:
    """The matplotlib colour map of :func:`render_overlay`'s colours, for colour bars and keys.

    Signed (default): blue (``-vmax``) – white (0) – red (``+vmax``), i.e. ``_signed_colour`` of
    ``s`` in ``[-1, 1]`` (matplotlib's ``bwr``, sampled with 0 exactly white); use it with limits
    ``[-vmax, vmax]`` (e.g. ``TwoSlopeNorm(0, -vmax, vmax)``). Unsigned: its upper half, white (0) –
    red (``vmax``), for maps that are never negative (attention, rollout), with limits ``[0, vmax]``.
    """
    from matplotlib.colors import ListedColormap

    s = np.linspace(-1.0, 1.0, 511) if signed else np.linspace(0.0, 1.0, 256)
    return ListedColormap(_signed_colour(s, 1.0) / 255.0, name="vitdecomp-signed" if signed else "vitdecomp-pos")


def panel_figure(
    overlay: Image.Image,
    *,
    vmax: float,
    prefix: dict[str, float] | None = None,
    title: str | None = None,
    min_height: int = 256,
    label: str = PANEL_LABEL,
) -> Any:
    """The matplotlib figure of :func:`render_panel` (same arguments), before it is drawn to pixels."""
    import textwrap

    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import FixedLocator
    from PIL import Image

    factor = max(1, -(-int(min_height) // max(1, overlay.height)))
    big = overlay.convert("RGB").resize((overlay.width * factor, overlay.height * factor), Image.Resampling.NEAREST)
    scale = float(vmax) if vmax is not None and float(vmax) > 0 else 1.0
    prefix = dict(prefix or {})
    dpi, font, line = 100, 9.0, 15  # 9 pt at 100 dpi: ~12.5 px glyphs, 15 px lines
    pad, bar_gap, bar_w, right = 10, 10, 14, 118
    width = pad + big.width + bar_gap + bar_w + right
    wrap_chars = max(16, int((width - 2 * pad) / 6.6))
    title_lines = textwrap.wrap(title, wrap_chars) if title else []
    label_lines = textwrap.wrap(label, max(12, int((big.height - 4) / 6.6))) or [label]
    per_row = max(1, (width - 2 * pad) // 150)
    n_rows = max(1, -(-len(prefix) // per_row))
    title_h = line * len(title_lines) + (6 if title_lines else 0)
    height = pad + title_h + big.height + pad + n_rows * 20 + pad
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.patch.set_facecolor("white")

    def box(x: float, y_top: float, w: float, h: float) -> list[float]:  # pixels from the top-left -> fractions
        return [x / width, 1.0 - (y_top + h) / height, w / width, h / height]

    for k, text in enumerate(title_lines):
        fig.text(pad / width, 1.0 - (pad + k * line) / height, text, ha="left", va="top", fontsize=font)
    top = pad + title_h
    fig.figimage(np.asarray(big), xo=pad, yo=height - top - big.height, origin="upper")
    cax = fig.add_axes(box(pad + big.width + bar_gap, top, bar_w, big.height))
    bar = fig.colorbar(ScalarMappable(norm=TwoSlopeNorm(0.0, -scale, scale), cmap=overlay_colormap(True)), cax=cax)
    bar.ax.yaxis.set_major_locator(FixedLocator([-scale, -scale / 2, 0.0, scale / 2, scale]))
    bar.ax.yaxis.set_major_formatter(lambda v, _: "0" if v == 0 else f"{v:+.3g}")
    bar.ax.tick_params(labelsize=font - 1)
    bar.set_label("\n".join(label_lines), fontsize=font - 0.5)
    bar.ax.set_gid("colorbar")
    y0 = top + big.height + pad
    if not prefix:
        fig.text(pad / width, 1.0 - (y0 + 3) / height, "no prefix tokens", ha="left", va="top", fontsize=font,
                 color="#59636E")
    cell_w = (width - 2 * pad) / per_row
    for k, (name, value) in enumerate(prefix.items()):
        x = pad + (k % per_row) * cell_w
        y = y0 + (k // per_row) * 20
        colour = tuple(float(c) / 255.0 for c in _signed_colour(np.float32(value), scale))
        fig.add_artist(Rectangle((x / width, 1.0 - (y + 16) / height), 14 / width, 14 / height,
                                 transform=fig.transFigure, facecolor=colour, edgecolor="black", linewidth=0.8))
        fig.text((x + 20) / width, 1.0 - (y + 9) / height, f"{name} {value:+.3g}", ha="left", va="center",
                 fontsize=font)
    return fig


def render_panel(
    overlay: Image.Image,
    *,
    vmax: float,
    prefix: dict[str, float] | None = None,
    title: str | None = None,
    path: str | Path | None = None,
    min_height: int = 256,
    label: str = PANEL_LABEL,
) -> Image.Image:
    """An overlay with its colour bar and the prefix tokens beside it, for reading a map.

    Drawn with matplotlib (Agg). Layout, in pixels: the title on top (wrapped to the width); the
    overlay, enlarged by a whole factor (nearest neighbour) until it is at least ``min_height``
    tall and drawn 1:1; to its right a colour bar of :func:`overlay_colormap` from ``-vmax``
    (blue) through 0 (white) to ``+vmax`` (red), ticks at ``±vmax, ±vmax/2, 0``, labelled with
    ``label`` (what the values are, with units); below, one swatch per prefix token (CLS,
    registers), coloured on the same scale and labelled with its value, since these tokens have
    no place on the image. The panel is ``overlay width × factor + 152`` pixels wide.

    Args:
        overlay: e.g. from :func:`render_original`.
        vmax: the value of full saturation used for the overlay (0: a blank map, scale ±1).
        prefix: ``{name: value}`` of the prefix tokens (empty or None: "no prefix tokens").
        title: a caption line.
        path: where to save it.
        min_height: smallest height of the enlarged overlay.
        label: the colour bar's label, e.g. ``"contribution to <w_c, z> (logit units)"``.

    Returns:
        The panel as an RGB image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig = panel_figure(overlay, vmax=vmax, prefix=prefix, title=title, min_height=min_height, label=label)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    result = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy(), mode="RGB")
    if path is not None:
        _save(result, path, "render_panel")
    return result


# ----------------------------------------------------------------------- CompAlign
def aligned_directions(align: CompAlign, directions: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Pull CLIP-space directions back through CompAlign maps, to contract before expanding.

    With ``a_i = F_{g(i)} c_i`` (``F_g [d_clip, d_model]``, ``g(i)`` the map of component ``i``),
    ``<y_j, a_{i,t}> = <F_{g(i)}ᵀ y_j, c_{i,t}>``. Returns the pulled-back rows
    ``D [k * n_maps, d_model]`` (row ``j * n_maps + g`` is ``F_gᵀ y_j``) for
    ``decompose(..., directions=D)``, and per component the columns ``[j * n_maps + g(i) for j]``
    that :func:`take_columns` keeps.

    Args:
        align: fitted maps (:class:`~vitdecomp.interpret.align.CompAlign`).
        directions: ``[k, d_clip]`` (or ``[d_clip]``) in the CLIP space.
    """
    import torch

    y = directions[None] if directions.dim() == 1 else directions
    if y.dim() != 2 or y.shape[1] != align.d_clip:
        raise InputError(f"directions must be [k, {align.d_clip}] (the alignment's CLIP width), "
                         f"got {tuple(directions.shape)}")
    maps = align.group_maps.to(torch.float64)
    pulled = torch.einsum("gcm,kc->kgm", maps, y.to(torch.float64))  # [k, n_maps, d_model]
    rows = pulled.reshape(-1, align.d_model)
    n = align.n_maps
    columns = [[j * n + g for j in range(y.shape[0])] for g in align.map_index]
    return rows, columns


def take_columns(stack: ComponentStack, columns: Sequence[Sequence[int]]) -> ComponentStack:
    """Each component keeps its own columns of a projected stack.

    ``values'[i, ..., j] = values[i, ..., columns[i][j]]`` (``[comp, batch, (token,) k']``), and the
    reference becomes the sum of the new values over components (and tokens), accumulated in
    float64, so the result is again an exact decomposition (of the per-component contraction,
    e.g. ``<y, Σ_i F_i c_i>`` after :func:`aligned_directions`).

    Raises:
        InputError: not one column list per component, lists of unequal length, or a column
            out of range.
    """
    import torch

    if len(columns) != stack.n_components:
        raise InputError(f"{len(columns)} column lists for {stack.n_components} components")
    widths = {len(c) for c in columns}
    if len(widths) != 1 or 0 in widths:
        raise InputError("every component needs the same, non-zero number of columns")
    idx = torch.as_tensor([list(c) for c in columns], dtype=torch.long, device=stack.values.device)
    if int(idx.min()) < 0 or int(idx.max()) >= stack.dim:
        raise InputError(f"columns must lie in 0..{stack.dim - 1}")
    values = stack.values
    shape = (idx.shape[0],) + (1,) * (values.dim() - 2) + (idx.shape[1],)
    picked = torch.take_along_dim(values, idx.reshape(shape).expand(*values.shape[:-1], idx.shape[1]), dim=-1)
    total = picked.to(torch.float64).sum(0)
    if stack.has_tokens:
        total = total.sum(1)
    return replace(stack, values=picked, reference=total.to(values.dtype), space="projected", scale=None,
                   meta={**stack.meta, "columns": "per-component"})
