"""``decompose()``: split a model's representation exactly into its components.

One hooked forward pass of the unmodified model captures what the direct effects need;
the readout is applied with frozen statistics; the result is checked against the model's
own output before it is returned (docs/method.md §2).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InputError
from .stack import ComponentStack, check_error, default_rtol, relative_error

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .model import Model

__all__ = ["decompose", "iter_decompose"]

log = logging.getLogger(__name__)

_GRANULARITIES = ("layer", "head", "head_token")
_LN_MODES = ("centered", "anchor")
_BIAS_MODES = ("explicit", "anchor", "split")


def decompose(
    model: Model | nn.Module,
    pixels: torch.Tensor,
    *,
    granularity: Literal["layer", "head", "head_token"] = "head",
    start_layer: int = 0,
    ln_mode: Literal["centered", "anchor"] = "centered",
    bias_mode: Literal["explicit", "anchor", "split"] = "explicit",
    mlp_neurons: bool = False,
    directions: torch.Tensor | None = None,
    normalize: bool = False,
    dtype: torch.dtype | None = None,
    check: bool = True,
    rtol: float | None = None,
) -> ComponentStack:
    """Decompose the representation of ``pixels`` into direct component contributions.

    With ``x^{s-1}`` the residual stream entering block ``s = start_layer``,

        z = R(x^{s-1}) + sum_{l >= s} [ sum_h R(c_{l,h}) + R(b_l) + R(m_l) ] + kappa,

    where ``R`` is the readout (final norm with frozen statistics, pooling, projection)
    without its constants, ``c_{l,h}`` head ``h``'s write, ``b_l`` the attention biases,
    ``m_l`` the MLP write and ``kappa`` the readout constants (the ``bias`` row).

    Args:
        model: a :class:`~vitdecomp.Model` (from ``load``/``wrap``) or a stock module.
        pixels: ``[batch, 3, H, W]`` preprocessed images.
        granularity: ``"layer"`` (attention and MLP per block), ``"head"`` (every head),
            ``"head_token"`` (every head split by source token: values ``[comp, batch, token, d]``).
        start_layer: first block decomposed; everything before it is one exact ``rest`` row
            (``embed`` when 0). Negative counts from the end.
        ln_mode: ``"centered"`` (each component centred; default) or ``"anchor"`` (published
            convention, constants split over components), docs/method.md §2.2.
        bias_mode: ``"explicit"`` (per-layer ``Lxx.bias`` rows), ``"anchor"`` (value bias kept
            in the values, output bias split over heads) or ``"split"`` (all constants split
            equally), docs/method.md §2.1.
        mlp_neurons: split each MLP into per-neuron terms ``act_n W_out[:, n]`` plus ``Lxx.mlp_bias``.
        directions: ``[k, d_z]``: return contributions to these directions only (values
            ``[..., k]``); for ``head_token`` the projection happens before the token expansion.
        normalize: divide every term by ``||z||`` so dot products with unit texts are cosines.
        dtype: ``torch.float64`` runs the model itself in float64 (tolerance 1e-10);
            default: the model's dtype (float32: tolerance 1e-5).
        check: raise :class:`~vitdecomp.errors.DecompositionError` above tolerance.
        rtol: override the tolerance.

    Returns:
        A :class:`ComponentStack` whose rows sum to the model's own representation.
    """
    m, x, run_dtype, options = _arguments(
        model, pixels, granularity, start_layer, ln_mode, bias_mode, mlp_neurons, directions, normalize, dtype
    )
    tol = rtol if rtol is not None else default_rtol(run_dtype)
    options["meta"]["rtol"] = tol
    from .engines import engine_for

    with prepared(m.module, run_dtype), input_errors(m, pixels):
        structure = m.structure  # built after the cast: it reads the weights
        stack = engine_for(structure.engine)(structure, x, **options)
    if check:
        stack.check(tol)
    return stack


def iter_decompose(
    model: Model | nn.Module,
    pixels: torch.Tensor,
    *,
    granularity: Literal["layer", "head", "head_token"] = "head",
    start_layer: int = 0,
    ln_mode: Literal["centered", "anchor"] = "centered",
    bias_mode: Literal["explicit", "anchor", "split"] = "explicit",
    mlp_neurons: bool = False,
    directions: torch.Tensor | None = None,
    normalize: bool = False,
    dtype: torch.dtype | None = None,
    check: bool = True,
    rtol: float | None = None,
) -> Iterator[ComponentStack]:
    """:func:`decompose`, delivered one part at a time: for token stacks that do not fit.

    Yields :class:`ComponentStack` parts (same arguments and meaning as :func:`decompose`):
    for ViT-family models the embedding or ``rest`` row, then each block's rows, then the
    readout terms; other engines yield their whole stack as one part. Every part carries
    the full ``reference``; concatenated, the parts are the stack :func:`decompose` returns.
    The model's forward pass runs (and the model is restored) before the first part is
    yielded. Parts are built only when asked for, so a consumer that reduces each part
    (a heatmap, a running statistic) holds one block's ``[comp, batch, token, k]`` at a time.

    Exactness: the parts' sum is accumulated in float64 as they are yielded; after the
    last part the generator raises :class:`~vitdecomp.errors.DecompositionError` if
    ``||sum - reference|| / scale`` exceeds the tolerance (the scale of the unprojected
    representation, see :class:`ComponentStack`). Consume it to the end.
    """
    import torch

    from .engines import engine_for, parts_engine_for

    m, x, run_dtype, options = _arguments(
        model, pixels, granularity, start_layer, ln_mode, bias_mode, mlp_neurons, directions, normalize, dtype
    )
    tol = rtol if rtol is not None else default_rtol(run_dtype)
    options["meta"]["rtol"] = tol
    with prepared(m.module, run_dtype), input_errors(m, pixels):
        structure = m.structure  # built after the cast: it reads the weights
        engine_parts = parts_engine_for(structure.engine)
        if engine_parts is None:
            parts: Iterator[ComponentStack | None] = iter([engine_for(structure.engine)(structure, x, **options)])
        else:
            parts = engine_parts(structure, x, **options)
            next(parts)  # runs the forward pass and reads the model
    total: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    while True:
        with torch.no_grad():
            part = next(parts, None)
        if part is None:
            break
        assert isinstance(part, ComponentStack)
        total = part.total() if total is None else total + part.total()
        reference, scale = part.reference, part.scale
        yield part
        del part
    if check and total is not None and reference is not None:
        check_error(relative_error(total, reference, scale), tol, m.name)


def _arguments(
    model: Any,
    pixels: Any,
    granularity: str,
    start_layer: int,
    ln_mode: str,
    bias_mode: str,
    mlp_neurons: bool,
    directions: Any,
    normalize: bool,
    dtype: Any,
) -> tuple[Model, torch.Tensor, torch.dtype, dict[str, Any]]:
    """Validate the arguments; return the wrapped model, the input, the run dtype and engine options."""
    import torch

    from .model import wrap

    if granularity not in _GRANULARITIES:
        raise InputError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    if ln_mode not in _LN_MODES:
        raise InputError(f"ln_mode must be one of {_LN_MODES}, got {ln_mode!r}")
    if bias_mode not in _BIAS_MODES:
        raise InputError(f"bias_mode must be one of {_BIAS_MODES}, got {bias_mode!r}")
    m = wrap(model)
    if not isinstance(pixels, torch.Tensor):
        raise InputError(f"pixels must be a tensor [batch, 3, H, W], got {type(pixels).__name__}")
    if pixels.dim() == 3:
        raise InputError("pixels must be a batch [batch, 3, H, W]; add a batch axis with pixels[None]")
    if pixels.dim() != 4 or pixels.shape[0] == 0:
        raise InputError(f"pixels must be [batch, 3, H, W], got shape {tuple(pixels.shape)}")
    if not torch.is_floating_point(pixels):
        raise InputError("pixels must be a float tensor (preprocessed, normalised)")
    if directions is not None and (directions.dim() != 2):
        raise InputError(f"directions must be [k, d], got shape {tuple(directions.shape)}")
    run_dtype = dtype or m.dtype
    compute_dtype = torch.float64 if run_dtype == torch.float64 else torch.float32
    options: dict[str, Any] = dict(
        granularity=granularity,
        start_layer=start_layer,
        ln_mode=ln_mode,
        bias_mode=bias_mode,
        mlp_neurons=mlp_neurons,
        directions=directions,
        normalize=normalize,
        compute_dtype=compute_dtype,
        meta={"model": m.name, "family": m.family, "weights": m.weights, "dtype": str(run_dtype).replace("torch.", "")},
    )
    return m, pixels.to(device=m.device, dtype=run_dtype), run_dtype, options


@contextmanager
def input_errors(m: Model, pixels: torch.Tensor) -> Iterator[None]:
    """Turn a model's own complaint about the input size into an :class:`InputError`."""
    try:
        yield
    except (AssertionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        text = str(exc).lower()
        if "size" in text or "shape" in text or "match" in text:
            raise InputError(
                f"the model rejected pixels of shape {tuple(pixels.shape)}: {exc} "
                f"(expected input size {m.preprocessing.input_size})"
            ) from exc
        raise


@contextmanager
def prepared(module: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """eval(), no_grad, and (for a different dtype) a temporary cast; all restored on exit."""
    import torch

    was_training = module.training
    params = list(module.parameters())
    original: Any = params[0].dtype if params else dtype
    if was_training:
        log.info("decompose: switching %s to eval() for the pass (dropout would break exactness)", type(module).__name__)
        module.eval()
    if original != dtype:
        module.to(dtype)
    try:
        with torch.no_grad():
            yield
    finally:
        if original != dtype:
            module.to(original)
        if was_training:
            module.train()
