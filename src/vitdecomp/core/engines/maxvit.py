"""Direct-effect decomposition of MaxViT (timm ``MaxxVit``) in one hooked forward pass (docs/method.md §2.6).

**Layers.** A ``MaxxVitBlock`` is three residual *units*, and a unit is what this engine calls a
layer (the sub-layer convention of docs/method.md §1; configs that quote layer counts must say so):

* ``conv``: ``x <- S(x) + F(x)``, the MBConv (or ConvNeXt) block. ``F`` (pre-norm, 1x1 expand,
  depthwise kxk, SE, 1x1 projection) is one non-linear leaf. ``S`` is the identity, or in the
  first block of a stage the downsample shortcut ``S(x) = W pool(x) + b`` (2x2 average pool, 1x1
  conv): linear, so every upstream write passes through it and ``b`` is a constant;
* ``window``: block attention over ``P x P`` windows, then the MLP (pre-norm, LayerScale folded);
* ``grid``: grid attention over a dilated ``G x G`` grid, then the MLP.

Global layer ``l`` is the unit index (``3 j``, ``3 j + 1``, ``3 j + 2`` for the ``j``-th
MaxxVitBlock; two units when the model has no block attention). Labels name the stage and the
unit inside the stage: ``S1.B00.conv``, ``S1.B01.H02`` (window head 2), ``S1.B02.H02`` (grid
head 2), ``S1.B02.mlp``; ``start_layer`` counts units, and everything before it is one exact
``rest`` row. ``stack.meta["units"]`` lists every unit with its module path.

**Heads.** Window and grid partitions are reshape/permute maps (timm's own ``window_partition`` /
``grid_partition``), so head ``h`` of a unit writes at grid position ``p``

    c^h_p = gamma_1 * sum_{s in part(p)} alpha^h_{p,s} W_O^h W_V^h u_s

with ``alpha`` the softmax of ``q k^T / sqrt(d_h)`` plus the relative-position bias, frozen at its
actual value, and ``u = LN_1(x)``. Rows of ``alpha`` sum to 1, so ``gamma_1 (b_O + sum_h W_O^h
b_V^h)`` is one constant per unit (``bias_mode="explicit"``), as in :mod:`vitdecomp.core.engines.vit`.

**Readout.** The representation is timm's pre-logits feature,
``forward_head(forward_features(x), pre_logits=True)``: either

* norm-then-pool (``ClassifierHead``; ``maxvit_*_rw``, ``maxxvit*``):
  ``z = (1/P) sum_p LN(x_p)`` with per-position statistics frozen, or
* pool-then-norm (``NormMlpClassifierHead`` without its hidden tanh MLP):
  ``z = LN((1/P) sum_p x_p)`` with one set of statistics frozen.

Both are ``z = sum_i G(sum_p omega_p c_{i,p}) * tau + kappa``: per-position weights ``omega``
(``1/(P sigma_p)``, or ``1/P``), a per-image scalar ``tau`` (``1/sigma`` of the pooled norm, or 1),
the channel map ``G = gamma * Pi`` (``gamma`` alone with ``ln_mode="anchor"``) and the constant
``kappa`` (the ``bias`` row).

**Through the downsamples.** A write ``a`` on the grid of an earlier stage reaches the final
grid through the later shortcuts ``a -> W pool(a)``. Average pooling acts on every channel alike
and the 1x1 conv on every position alike, so they commute, and

    sum_p omega_p [W_K ... W_1 pool_K(... pool_1(a))]_p = W_K ... W_1 sum_q omega^(1)_q a_q,

where ``omega^(k) = pool_k^T omega^(k+1)`` is the adjoint of the (linear) pool applied to the
weights; it is computed with autograd through the model's own pool module, so any linear pool
(``avg2``, overlapping ``avg`` with ``count_include_pad=False``, TF "same" padding) is exact.
Every component is therefore reduced on its own grid to one vector ``sum_q omega_q a_q``
(``[C_k]``), then mapped by the channel chain ``W_K ... W_{k+1}``, ``G`` and the directions.
For a head, ``sum_p omega_p alpha_{p,s} = beta_s`` is formed per source ``s`` inside each
partition, never a ``[query, key, d]`` tensor.

**Tokens.** ``granularity="head_token"`` splits every term by position: a head by its *source*
position ``s``, the conv branch, MLP and constants by the position they write to, ``rest`` by
its own position. Stages have different grids, so the token axis is the **final stage grid**
(``TokenInfo.grid``, row-major): a term at a position of an earlier, finer grid is assigned to
the final-grid cell containing it (row ``r -> floor(r H_K / H_k)``, likewise columns), i.e. the
per-source terms are regrouped, never split, so token terms sum exactly to the head terms for
every ``start_layer``. With ``start_layer`` inside the last stage, tokens are exactly source
positions.

**Constants.** ``bias_mode="explicit"``: a ``bias`` row per attention unit (``gamma_1 (b_O + sum_h
W_O^h b_V^h)``) and per conv unit with a biased shortcut (its ``b``). ``"anchor"`` keeps ``b_V``
in the values and shares ``gamma_1 b_O`` equally by the unit's heads (``H x T`` cells for tokens);
``"split"`` shares the whole attention constant that way. In both, a conv unit's shortcut bias is
added to its ``conv`` row (the block's own constant). The readout constant follows ``ln_mode`` as
in :mod:`vitdecomp.core.readout`.

**Cost.** One forward pass, one recomputation of each partition's attention pattern from the
captured ``qkv`` (the model's own attention cost). Until the end of the pass (the final norm's
per-position statistics fix ``omega``) each decomposed unit keeps its pattern
``[B, H, HW, P^2]``, values and MLP write ``[B, HW, C]``; then each component costs
``O(HW C)`` to reduce plus one ``C_k x d_z`` map per head.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..capture import hooks
from ...errors import InputError, UnsupportedModelError
from ..labels import ComponentLabel
from ..readout import ViTReadout
from ..stack import ComponentStack, TokenInfo, projected_scale

if TYPE_CHECKING:
    from torch import nn

    from ..adapters.base import CapturePoint
    from ..readout import FrozenNorm

__all__ = ["ConvUnitMap", "MaxViTMap", "PartitionUnitMap", "ShortcutMap", "decompose_maxvit"]

log = logging.getLogger(__name__)

Granularity = Literal["layer", "head", "head_token"]
BiasMode = Literal["explicit", "anchor", "split"]


# ----------------------------------------------------------------------------- structure
@dataclass
class ShortcutMap:
    """The linear shortcut of a conv unit, ``S(x) = W pool(x) + b``.

    Attributes:
        pool: the model's own spatial pooling module (linear, no parameters), or None.
        weight: channel map ``W`` ``[C_out, C_in]`` (a 1x1 conv), or None for the identity.
        bias: ``b`` ``[C_out]`` or None.
    """

    pool: nn.Module | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class ConvUnitMap:
    """The conv unit ``x <- S(x) + F(x)`` of a MaxxVitBlock (NCHW tensors).

    Attributes:
        module: the MbConv/ConvNeXt block; its input is the residual stream ``[B, C, H, W]``.
        stage: stage index (0 at the input).
        index: unit index inside the stage (labels ``S{stage}.B{index:02d}``).
        layer: global unit index.
        path: the module's path in the model (for messages and ``meta["units"]``).
        branch: capture point whose output is ``F(x)`` ``[B, C_out, H', W']``.
        shortcut: the linear shortcut, or None for the identity.
        kind: ``"mbconv"`` or ``"convnext"``.
    """

    module: nn.Module
    stage: int
    index: int
    layer: int
    path: str
    branch: CapturePoint
    shortcut: ShortcutMap | None
    kind: str = "mbconv"
    layout: str = "nchw"


@dataclass
class PartitionUnitMap:
    """A partition-attention unit ``x + ls1 * attn(LN_1 x)``, then ``+ ls2 * mlp(LN_2 x)`` (NHWC).

    Attributes:
        module: the ``PartitionAttentionCl``; its input is the residual stream ``[B, H, W, C]``.
        stage, index, layer, path: as in :class:`ConvUnitMap`.
        partition: ``"window"`` (block attention) or ``"grid"``.
        partition_fn: the model's partition function, ``[B, H, W, C] -> [B * nW, Ph, Pw, C]``.
        n_heads: H.
        d_head: d_h.
        scale: softmax temperature applied to ``q k^T``.
        w_out: ``[H, d_h, C]``: head ``h`` writes ``y_h @ w_out[h]``.
        b_out: output-projection bias ``[C]`` or None.
        v_bias: value bias ``[H, d_h]`` or None.
        qkv: capture point of the qkv projection output ``[B * nW, Ph, Pw, 3 C]``.
        split_qkv: maps that output to ``q, k, v`` each ``[B * nW, H, Ph Pw, d_h]``.
        rel_bias: returns the additive relative-position bias ``[H, Ph Pw, Ph Pw]``, or None.
        ls1: attention LayerScale gamma ``[C]`` or None.
        mlp_write: capture point whose output is the MLP's write (after LayerScale) ``[B, H, W, C]``.
        mlp_hidden: capture point of the MLP hidden activations (input of ``fc2``), or None.
        w_mlp_out: ``[d_mlp, C]`` output projection with LayerScale folded in, or None.
        b_mlp_out: ``[C]`` output bias with LayerScale folded in, or None.
    """

    module: nn.Module
    stage: int
    index: int
    layer: int
    path: str
    partition: str
    partition_fn: Callable[[torch.Tensor], torch.Tensor]
    n_heads: int
    d_head: int
    scale: float
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    v_bias: torch.Tensor | None
    qkv: CapturePoint
    split_qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rel_bias: Callable[[], torch.Tensor] | None
    ls1: torch.Tensor | None
    mlp_write: CapturePoint
    mlp_hidden: CapturePoint | None = None
    w_mlp_out: torch.Tensor | None = None
    b_mlp_out: torch.Tensor | None = None
    layout: str = "nhwc"


Unit = ConvUnitMap | PartitionUnitMap


@dataclass
class MaxViTMap:
    """A MaxViT as the ``"maxvit"`` engine sees it.

    Attributes:
        units: every residual unit (conv, window, grid), input to output; the list index is
            the global layer index.
        token_norm: per-position norm after the last stage (timm ``norm``), or None.
        pooled_norm: norm after the average pool (``NormMlpClassifierHead.norm``), or None.
        final: capture point whose output is the last stage's output ``[B, C_K, H_K, W_K]``.
        forward: the stock forward returning the representation ``[B, d_z]``.
        head: the head's class name (for ``describe``).
        engine: ``"maxvit"``.
    """

    units: list[Unit]
    token_norm: FrozenNorm | None
    pooled_norm: FrozenNorm | None
    final: CapturePoint
    forward: Callable[[torch.Tensor], torch.Tensor]
    head: str = "ClassifierHead"
    engine: str = "maxvit"

    @property
    def blocks(self) -> list[Unit]:
        """Every unit (the engine's layers), input to output."""
        return self.units

    def describe(self) -> dict[str, Any]:
        """Facts for tables and manifests."""
        stages = sorted({u.stage for u in self.units})
        attn = [u for u in self.units if isinstance(u, PartitionUnitMap)]
        return {
            "blocks": len(self.units),
            "layer_convention": "maxvit units: conv, window attention+MLP, grid attention+MLP per MaxxVitBlock",
            "depths": [sum(isinstance(u, ConvUnitMap) and u.stage == s for u in self.units) for s in stages],
            "heads": [next((u.n_heads for u in attn if u.stage == s), 0) for s in stages],
            "width": [next((int(u.w_out.shape[-1]) for u in attn if u.stage == s), None) for s in stages],
            "conv": sorted({u.kind for u in self.units if isinstance(u, ConvUnitMap)}),
            "prefix_tokens": [],
            "pool": "avg",
            "head": self.head,
            "token_norm": self.token_norm.kind if self.token_norm else None,
            "pooled_norm": self.pooled_norm.kind if self.pooled_norm else None,
            "projection": None,
        }


# ----------------------------------------------------------------------------- pass state
@dataclass
class _ConvCap:
    in_grid: tuple[int, int] | None = None
    out_grid: tuple[int, int] | None = None
    rows: torch.Tensor | None = None  # F(x) [B, N_out, C_out]


@dataclass
class _PartCap:
    grid: tuple[int, int] | None = None
    qkv: torch.Tensor | None = None
    alpha: torch.Tensor | None = None  # [B, nW, H, Nw, Nw]
    v: torch.Tensor | None = None  # [B, nW, H, Nw, dh]
    pos: torch.Tensor | None = None  # [nW, Nw] grid position of each partition slot
    mlp: torch.Tensor | None = None  # [B, N, C]
    hidden: torch.Tensor | None = None  # [B, N, d_mlp]


@dataclass
class _Pass:
    x_in: torch.Tensor | None = None  # [B, N_0, C_0]
    in_grid: tuple[int, int] | None = None
    final: torch.Tensor | None = None  # [B, N_K, C_K]
    final_grid: tuple[int, int] | None = None
    conv: dict[int, _ConvCap] = field(default_factory=dict)
    part: dict[int, _PartCap] = field(default_factory=dict)


def _rows(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, C, H, W]`` (nchw) or ``[B, H, W, C]`` (nhwc) -> rows ``[B, H W, C]`` (row-major) and ``(H, W)``."""
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2), (int(x.shape[-2]), int(x.shape[-1]))
    return x.reshape(x.shape[0], -1, x.shape[-1]), (int(x.shape[1]), int(x.shape[2]))


# ----------------------------------------------------------------------------- engine
def decompose_maxvit(
    smap: MaxViTMap,
    pixels: torch.Tensor,
    *,
    granularity: Granularity = "head",
    start_layer: int = 0,
    ln_mode: str = "centered",
    bias_mode: BiasMode = "explicit",
    mlp_neurons: bool = False,
    directions: torch.Tensor | None = None,
    normalize: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    meta: dict[str, Any] | None = None,
) -> ComponentStack:
    """Decompose one batch of a MaxViT; see :func:`vitdecomp.decompose` for the arguments.

    Args:
        smap: the adapter's :class:`MaxViTMap`.
        pixels: ``[B, 3, H, W]`` preprocessed images.
        granularity: ``"layer"``, ``"head"`` or ``"head_token"`` (token axis: the final stage grid,
            see the module docstring).
        start_layer: first decomposed *unit* (conv / window / grid); negative counts from the end.
        ln_mode: ``"centered"`` or ``"anchor"`` (docs/method.md §2.2).
        bias_mode: ``"explicit"``, ``"anchor"`` or ``"split"`` (docs/method.md §2.1).
        mlp_neurons: split every attention unit's MLP into per-neuron terms plus ``mlp_bias``.
        directions: ``[K, d_z]``: contributions to these directions only (applied before the
            token expansion).
        normalize: divide every term by ``||z||``.
        compute_dtype: float32 or float64.
        meta: facts recorded in ``stack.meta``.

    Returns:
        A :class:`ComponentStack` ``[comp, B, (T,) d_z or K]`` summing to the representation.
    """
    units = smap.units
    n_layers = len(units)
    s0 = start_layer + n_layers if start_layer < 0 else start_layer
    if not 0 <= s0 < n_layers:
        raise InputError(f"start_layer={start_layer} is outside a model with {n_layers} units (layers)")
    tokens = granularity == "head_token"
    if mlp_neurons and tokens:
        raise InputError("mlp_neurons=True is not available with granularity='head_token'")
    centre = ln_mode == "centered"
    dt = compute_dtype
    dirs = directions.detach().to(device=pixels.device, dtype=dt) if directions is not None else None
    readout = ViTReadout(token_norm=smap.token_norm, pool="avg", pooled_norm=smap.pooled_norm)

    st = _Pass()

    # ---- hooks -------------------------------------------------------------------------
    def on_unit_input(u: int) -> Callable[[torch.Tensor], None]:
        unit = units[u]

        def fn(x: torch.Tensor) -> None:
            rows, grid = _rows(x, unit.layout)
            if u == s0:
                st.x_in, st.in_grid = rows.to(dt).clone(), grid
            if isinstance(unit, ConvUnitMap):
                st.conv.setdefault(u, _ConvCap()).in_grid = grid
            else:
                st.part.setdefault(u, _PartCap()).grid = grid

        return fn

    def on_branch(u: int) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            cap = st.conv.setdefault(u, _ConvCap())
            rows, cap.out_grid = _rows(x, "nchw")
            cap.rows = rows.to(dt).clone()

        return fn

    def store(u: int, key: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            if key == "qkv":  # read at the unit's end, before anything can write to it
                st.part.setdefault(u, _PartCap()).qkv = x
                return
            setattr(st.part.setdefault(u, _PartCap()), key, x.reshape(x.shape[0], -1, x.shape[-1]).to(dt).clone())

        return fn

    def on_unit_end(u: int) -> Callable[[torch.Tensor], None]:
        def fn(_: torch.Tensor) -> None:
            cap = st.part[u]
            assert cap.qkv is not None and cap.grid is not None and cap.mlp is not None
            unit = units[u]
            assert isinstance(unit, PartitionUnitMap)
            cap.alpha, cap.v, cap.pos = _attention(unit, cap.qkv, cap.grid, cap.mlp.shape[0], bias_mode, dt)
            cap.qkv = None

        return fn

    def on_final(x: torch.Tensor) -> None:
        rows, st.final_grid = _rows(x, "nchw")
        st.final = rows.to(dt).clone()

    specs: list[Any] = []
    for u in range(s0, n_layers):
        unit = units[u]
        specs.append((unit.module, "input", on_unit_input(u)))
        if isinstance(unit, ConvUnitMap):
            specs.append((unit.branch.module, unit.branch.where, on_branch(u)))
            continue
        specs.append((unit.qkv.module, unit.qkv.where, store(u, "qkv")))
        specs.append((unit.mlp_write.module, unit.mlp_write.where, store(u, "mlp")))
        if mlp_neurons:
            if unit.mlp_hidden is None or unit.w_mlp_out is None:
                raise InputError("this model does not expose MLP hidden activations; use mlp_neurons=False")
            specs.append((unit.mlp_hidden.module, unit.mlp_hidden.where, store(u, "hidden")))
        specs.append((unit.module, "output", on_unit_end(u)))
    specs.append((smap.final.module, smap.final.where, on_final))

    with hooks(specs):
        try:
            reference = smap.forward(pixels)
        except AssertionError as exc:  # timm asserts that every stage grid splits into partitions
            raise InputError(
                f"the model rejected pixels of shape {tuple(pixels.shape)}: {exc}. MaxViT needs every stage "
                "grid (input size / 4, / 8, ...) to be a multiple of its window and grid partition sizes; "
                "use the model's own input size (model.preprocessing.input_size)"
            ) from exc
    seen = sum(1 for u in range(s0, n_layers) if (st.conv.get(u) or st.part.get(u)) is not None)
    if st.final is None or st.x_in is None or seen != n_layers - s0:
        raise InputError("the model's forward did not run through its blocks; is this the right model?")
    reference = reference.to(dt)
    batch = reference.shape[0]
    dev = reference.device

    # ---- levels: the grids between linear shortcuts, from s0's input to the final grid ---
    assert st.in_grid is not None and st.final_grid is not None
    grids: list[tuple[int, int]] = [st.in_grid]
    shortcuts: list[ShortcutMap] = []  # shortcuts[k] maps level k -> k + 1
    level: dict[int, int] = {}
    for u in range(s0, n_layers):
        unit = units[u]
        if isinstance(unit, ConvUnitMap) and unit.shortcut is not None:
            seen_c = st.conv[u]
            assert seen_c.in_grid is not None and seen_c.out_grid is not None
            if seen_c.in_grid != grids[-1]:
                raise InputError(f"{unit.path}: input grid {seen_c.in_grid} does not follow {grids[-1]}")
            shortcuts.append(unit.shortcut)
            grids.append(seen_c.out_grid)
        level[u] = len(grids) - 1
    last = len(grids) - 1
    if grids[last] != st.final_grid:
        raise InputError(f"the final grid {st.final_grid} is not the last unit's grid {grids[last]}")

    # ---- frozen readout: omega on the final grid, per-image scale, constant ----------------
    x_f = st.final
    n_final = x_f.shape[1]
    scale = torch.ones(batch, dtype=dt, device=dev)
    const = torch.zeros(batch, x_f.shape[-1], dtype=dt, device=dev)
    tn, pn = smap.token_norm, smap.pooled_norm
    if tn is not None:
        mu_p, inv_p = tn.stats(x_f)  # [B, P, 1]
        normed = tn.apply(x_f)
        omega_f = inv_p[..., 0] / n_final
        if tn.bias is not None:
            const = const + tn.bias.detach().to(dt)
        if not centre:
            gamma = tn.weight.detach().to(dt) if tn.weight is not None else torch.ones_like(const[0])
            const = const - (omega_f * mu_p[..., 0]).sum(1, keepdim=True) * gamma
    else:
        normed = x_f
        omega_f = torch.full((batch, n_final), 1.0 / n_final, dtype=dt, device=dev)
    if pn is not None:
        mu2, inv2 = pn.stats(normed.mean(1))
        const = pn.linear(const, True) * inv2 if centre else pn.linear(const - mu2, False) * inv2
        if pn.bias is not None:
            const = const + pn.bias.detach().to(dt)
        scale = scale * inv2[:, 0]
    if dirs is not None:
        const = const @ dirs.T

    # ---- omega on every level (adjoint of the pools), channel chains, token parents -------
    omegas: list[torch.Tensor] = [omega_f] * (last + 1)
    for k in range(last - 1, -1, -1):
        pool = shortcuts[k].pool
        omegas[k] = omegas[k + 1] if pool is None else _pool_adjoint(pool, omegas[k + 1], grids[k], grids[k + 1])
    chains: list[torch.Tensor | None] = [None] * (last + 1)
    for k in range(last - 1, -1, -1):
        w = shortcuts[k].weight
        step = w.detach().to(dt).T if w is not None else None  # [C_k, C_{k+1}]
        nxt = chains[k + 1]
        chains[k] = nxt if step is None else (step if nxt is None else step @ nxt)
    n_tok = n_final
    parents = [_parents(g, st.final_grid, dev) for g in grids]

    def out_map(k: int, rows: torch.Tensor) -> torch.Tensor:
        """Level-``k`` channel rows ``[..., C_k]`` -> output rows ``[..., d_z or K]`` (no statistics)."""
        chain = chains[k]
        out = readout.channel_map(rows if chain is None else rows @ chain, centre)
        return out @ dirs.T if dirs is not None else out

    def scaled(out: torch.Tensor) -> torch.Tensor:
        return out * scale.view(batch, *([1] * (out.dim() - 1)))

    def write_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
        """Per-position writes ``[B, N_k, C_k]`` -> ``[B, (T,) d]``."""
        om = omegas[k]
        if tokens:
            grouped = rows.new_zeros(batch, n_tok, rows.shape[-1]).index_add_(1, parents[k], om[..., None] * rows)
            return scaled(out_map(k, grouped))
        return scaled(out_map(k, torch.einsum("bn,bnc->bc", om, rows)))

    def write_const(vec: torch.Tensor | None, k: int) -> torch.Tensor | None:
        """A constant write ``vec [C_k]`` at every level-``k`` position -> ``[B, (T,) d]``."""
        if vec is None:
            return None
        mapped = out_map(k, vec.detach().to(dt))  # [d]
        om = omegas[k]
        if tokens:
            weight = om.new_zeros(batch, n_tok).index_add_(1, parents[k], om)
            return scaled(weight[..., None] * mapped)
        return scaled(om.sum(1)[:, None] * mapped)

    # ---- assemble rows -------------------------------------------------------------------
    labels: list[ComponentLabel] = [ComponentLabel("embed" if s0 == 0 else "rest")]
    rows: list[torch.Tensor] = [write_rows(st.x_in, 0)[None]]
    for u in range(s0, n_layers):
        unit = units[u]
        k = level[u]
        where: dict[str, Any] = {"stage": unit.stage, "block": unit.index}
        if isinstance(unit, ConvUnitMap):
            cap_c = st.conv[u]
            assert cap_c.rows is not None
            conv = write_rows(cap_c.rows, k)
            sc_bias = write_const(unit.shortcut.bias if unit.shortcut is not None else None, k)
            if sc_bias is not None and bias_mode != "explicit":
                conv, sc_bias = conv + sc_bias, None
            rows.append(conv[None])
            labels.append(ComponentLabel("conv", u, **where))
            if sc_bias is not None:
                rows.append(sc_bias[None])
                labels.append(ComponentLabel("bias", u, **where))
            continue
        cap = st.part[u]
        head_maps = out_map(k, _w_out_ls(unit, dt))  # [H, d_h, d]
        heads = _head_terms(cap, omegas[k], parents[k] if tokens else None, n_tok, head_maps)
        heads = scaled(heads)  # [B, H, (T,) d]
        n_heads = heads.shape[1]
        bias = write_const(_attn_bias(unit, bias_mode, dt), k)
        if bias is not None and bias_mode in ("anchor", "split"):
            if tokens:
                heads = heads + (bias.sum(1) / (n_heads * n_tok))[:, None, None, :]
            else:
                heads = heads + (bias / n_heads)[:, None, :]
            bias = None
        if granularity == "layer":
            rows.append(heads.sum(1)[None])
            labels.append(ComponentLabel("attn", u, **where))
        else:
            rows.append(heads.movedim(1, 0))
            labels.extend(ComponentLabel("head", u, head=h, **where) for h in range(n_heads))
        if bias is not None:
            rows.append(bias[None])
            labels.append(ComponentLabel("bias", u, **where))
        if mlp_neurons:
            assert cap.hidden is not None and unit.w_mlp_out is not None
            act = torch.einsum("bn,bnh->bh", omegas[k], cap.hidden)  # [B, d_mlp]
            neurons = scaled(act[..., None] * out_map(k, unit.w_mlp_out.detach().to(dt))[None])
            rows.append(neurons.movedim(1, 0))
            labels.extend(ComponentLabel("neuron", u, neuron=j, **where) for j in range(neurons.shape[1]))
            mlp_bias = write_const(unit.b_mlp_out, k)
            if mlp_bias is not None:
                rows.append(mlp_bias[None])
                labels.append(ComponentLabel("mlp_bias", u, **where))
        else:
            assert cap.mlp is not None
            rows.append(write_rows(cap.mlp, k)[None])
            labels.append(ComponentLabel("mlp", u, **where))
    values = torch.cat(rows, dim=0)

    # ---- the readout constant: its own row, or spread over the component rows ----------------
    const_value = const[:, None, :].expand(batch, n_tok, const.shape[-1]) / n_tok if tokens else const
    if ln_mode == "anchor" or bias_mode == "split":
        values = values + const_value[None] / values.shape[0]
    else:
        values = torch.cat([values, const_value[None]], dim=0)
        labels.append(ComponentLabel("const"))

    reference_out = reference @ dirs.T if dirs is not None else reference
    if normalize:
        norm = reference.norm(dim=-1).clamp_min(torch.finfo(dt).tiny)
        values = values / norm.view(1, batch, *([1] * (values.dim() - 2)))
        reference_out = reference_out / norm[:, None]

    info = dict(meta or {})
    info.update(
        granularity=granularity,
        start_layer=s0,
        n_layers=n_layers,
        ln_mode=ln_mode,
        bias_mode=bias_mode,
        mlp_neurons=mlp_neurons,
        normalize=normalize,
        projected=dirs is not None,
        layer_convention="maxvit-units",
        units=[_unit_info(unit) for unit in units],
        token_grid=list(st.final_grid) if tokens else None,
    )
    return ComponentStack(
        values=values,
        labels=tuple(labels),
        reference=reference_out,
        scale=projected_scale(reference, dirs, norm if normalize else None),
        space="projected" if dirs is not None else "model",
        tokens=TokenInfo(types=("patch",) * n_tok, grid=st.final_grid) if tokens else None,
        meta=info,
    )


# ----------------------------------------------------------------------------- helpers
def _attention(
    unit: PartitionUnitMap,
    qkv: torch.Tensor,
    grid: tuple[int, int],
    batch: int,
    bias_mode: str,
    dt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen patterns and values of one partition unit.

    Returns:
        ``alpha [B, nW, H, Nw, Nw]`` (query, key inside each partition), values without their
        bias unless ``bias_mode == "anchor"`` ``[B, nW, H, Nw, d_h]``, and ``pos [nW, Nw]``, the
        row-major grid position of every partition slot (from the model's own partition function).
    """
    q, k, v = (t.to(dt) for t in unit.split_qkv(qkv))  # [B*nW, H, Nw, dh]
    scores = (q @ k.transpose(-1, -2)) * unit.scale
    if unit.rel_bias is not None:
        scores = scores + unit.rel_bias().to(dt)[None]
    alpha = torch.softmax(scores, dim=-1)
    if bias_mode != "anchor" and unit.v_bias is not None:
        v = v - unit.v_bias.detach().to(dt)[None, :, None, :]
    n_part, n_heads, n_slot, d_head = v.shape
    n_win = n_part // batch
    index = torch.arange(grid[0] * grid[1], device=qkv.device).view(1, grid[0], grid[1], 1)
    pos = unit.partition_fn(index).reshape(n_win, n_slot)
    alpha = alpha.reshape(batch, n_win, n_heads, n_slot, n_slot)
    return alpha, v.reshape(batch, n_win, n_heads, n_slot, d_head), pos


def _head_terms(
    cap: _PartCap,
    omega: torch.Tensor,
    parent: torch.Tensor | None,
    n_tok: int,
    head_maps: torch.Tensor,
) -> torch.Tensor:
    """Per-head terms ``[B, H, d]`` (``[B, H, T, d]`` with token ``parent`` indices), unscaled.

    ``beta_s = sum_p omega_p alpha_{p,s}`` inside each partition; a head's term is
    ``sum_s beta_s v'_s @ head_maps[h]`` (``head_maps [H, d_h, d]`` = ``W_O^h``, LayerScale and
    every later linear map), its token terms the same sum over the sources in each token.
    """
    assert cap.alpha is not None and cap.v is not None and cap.pos is not None
    om = omega[:, cap.pos]  # [B, nW, Nw]
    beta = torch.einsum("bwi,bwhij->bwhj", om, cap.alpha)
    if parent is None:
        pooled = torch.einsum("bwhj,bwhjd->bhd", beta, cap.v)
        return torch.einsum("bhd,hdk->bhk", pooled, head_maps)
    batch, n_win, n_heads, n_slot, d_head = cap.v.shape
    weighted = (beta[..., None] * cap.v).permute(0, 2, 1, 3, 4).reshape(batch, n_heads, n_win * n_slot, d_head)
    grouped = weighted.new_zeros(batch, n_heads, n_tok, d_head).index_add_(2, parent[cap.pos.reshape(-1)], weighted)
    return torch.einsum("bhtd,hdk->bhtk", grouped, head_maps)


def _pool_adjoint(
    pool: nn.Module, omega: torch.Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]
) -> torch.Tensor:
    """``pool^T omega``: weights ``[B, N_out]`` on the pooled grid -> ``[B, N_in]`` on its input grid.

    The pool is linear and acts on each channel alike, so its adjoint on one channel is the
    gradient of ``<omega, pool(x)>`` with respect to ``x`` (any ``x``), taken through the
    model's own module.
    """
    batch = omega.shape[0]
    with torch.enable_grad():
        probe = torch.zeros(batch, 1, *grid_in, dtype=omega.dtype, device=omega.device, requires_grad=True)
        out = pool(probe)
        if tuple(out.shape[-2:]) != tuple(grid_out):
            raise UnsupportedModelError(
                f"shortcut pool {type(pool).__name__} maps {grid_in} to {tuple(out.shape[-2:])}, but the block "
                f"writes on {grid_out}"
            )
        (grad,) = torch.autograd.grad(out, probe, grad_outputs=omega.reshape(batch, 1, *grid_out))
    return grad.reshape(batch, -1).detach()


def _parents(grid: tuple[int, int], final: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Final-grid cell ``[N]`` (row-major) containing each position of ``grid``."""
    rows = torch.arange(grid[0], device=device) * final[0] // grid[0]
    cols = torch.arange(grid[1], device=device) * final[1] // grid[1]
    return (rows[:, None] * final[1] + cols[None, :]).reshape(-1)


def _w_out_ls(unit: PartitionUnitMap, dt: torch.dtype) -> torch.Tensor:
    """``W_O^h`` with LayerScale folded in: ``[H, d_h, C]``."""
    w = unit.w_out.detach().to(dt)
    return w if unit.ls1 is None else w * unit.ls1.detach().to(dt)


def _attn_bias(unit: PartitionUnitMap, bias_mode: str, dt: torch.dtype) -> torch.Tensor | None:
    """``ls1 * (b_O + sum_h W_O^h b_V^h)`` (``b_V`` left out in anchor mode, where v keeps it)."""
    total = unit.b_out.detach().to(dt) if unit.b_out is not None else None
    if bias_mode != "anchor" and unit.v_bias is not None:
        vb = torch.einsum("hd,hde->e", unit.v_bias.detach().to(dt), unit.w_out.detach().to(dt))
        total = vb if total is None else total + vb
    if total is not None and unit.ls1 is not None:
        total = total * unit.ls1.detach().to(dt)
    return total


def _unit_info(unit: Unit) -> dict[str, Any]:
    kind = unit.kind if isinstance(unit, ConvUnitMap) else unit.partition
    return {"layer": unit.layer, "label": f"S{unit.stage}.B{unit.index:02d}", "kind": kind, "module": unit.path}
