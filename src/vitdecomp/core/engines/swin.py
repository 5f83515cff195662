"""Direct-effect decomposition of a Swin Transformer in one hooked forward pass (docs/method.md §2.5).

**The model.** Stage ``k`` runs on a grid ``H_k x W_k`` of width ``C_k``. Stages ``k >= 1`` start
with a patch merge; every block is pre-norm,

    x <- x + WMSA(LN_1(x)),        x <- x + MLP(LN_2(x)),

where (S)W-MSA rolls the grid by ``-shift`` (shifted blocks), pads it to a multiple of the window
(zeros, after ``LN_1``), partitions it into ``M_h x M_w`` windows, attends inside each window with
the relative position bias and the ``-100`` cross-region mask, and undoes all of that. Both the
roll and the window partition are permutations, so head ``h`` writes at grid position ``p``

    c^h_p = sum_{s in win(p)} alpha^h_{p,s} W_O^h W_V^h u_s        (+ the bias terms below)

with ``u = LN_1(x)`` and ``s`` the *source* position on the same grid (padded sources have
``u_s = 0``). Rows of ``alpha`` sum to 1 (the mask is additive), so ``b_O + sum_h W_O^h b_V^h``
is one constant per block and position (``bias_mode="explicit"``).

**The readout.** A stage-``k`` write ``a [H_k, W_k, C_k]`` reaches the representation through
every later merge and then the final norm and the average pool. With every norm's statistics
frozen at their actual per-position values, each of these is linear:

* merge ``k -> k+1``: ``y_q = W_red (gamma_m * [Pi] a4_q / sigma_q)`` where ``a4_q`` is the
  ``4C`` concat of the 2x2 group of ``q`` (zero-padded at odd edges). The concat is a sum of
  placements into 4 *slots*, so position ``p`` enters through slot ``t(p)`` of ancestor ``q(p)``;
* final: ``z = (1/P) sum_q gamma_f * [Pi] y_q / sigma_q``.

So a stage-``k`` position ``p`` sees the output through a fixed linear map selected by its
*route* (the sequence of slots it takes through the later merges, ``4^{K-1-k}`` routes) times
a per-image scalar ``s_k(p)`` (the product of ``1/sigma`` of its ancestors, and ``1/P``):

    z_lin(a) = sum_r  Phi_r( sum_{p: route(p)=r} s_k(p) a_p ),

where ``Phi_r`` is the chain of merges (``[Pi]``, ``gamma``, ``W_red``) and the final
``gamma_f [Pi]``, without statistics. Each component is therefore pooled per route first
(``[.., R_k, C_k]``, cheap) and only then pushed through the merges, with a leading
component axis. A head needs only its per-query output pooled per route,
``sum_p s_k(p) sum_s alpha_{p,s} v'_s`` (``[B, R_k, H, d_h]``), never ``[query, key, d]``.

**Constants.** ``"centered"`` (default): every component is centred (``Pi`` over ``4C`` in
merges, over ``C`` in the final norm) and the constants (merge ``beta`` through ``W_red`` and the
later maps, final ``beta``) form the ``bias`` row. ``"anchor"``: components are not centred;
``-gamma mu / sigma`` joins the constants and the whole constant is split equally over the
component rows (as in :mod:`vitdecomp.core.engines.vit`).

**Tokens.** ``granularity="head_token"`` splits each head by source position. Different
stages have different grids, so a token stack covers the blocks of *one* stage: the last one
(``start_layer`` inside the last stage). Tokens are that stage's grid positions in row-major
order (``TokenInfo.grid = (H_K, W_K)``, window partition and cyclic shift undone); non-head rows
sit at the position they write to; a padded source (non-multiple grids) is not a position, so
in ``bias_mode="anchor"`` the value bias it carries is shared equally by the head's tokens.

**Labels.** ``S{k}.B{b:02d}.H{h:02d}`` / ``.bias`` / ``.mlp`` / ``.attn`` / ``.N{n:04d}`` with
``k`` the stage (0-based, timm's ``layers[k]``), ``b`` the block within the stage and the global
block index in ``ComponentLabel.layer`` (what ``start_layer`` and ``select(layer=...)`` count);
``embed`` (patch embedding output, including its norm) or ``rest``; ``bias`` for the readout
constant.

**Cost.** One forward pass, one recomputation of every window's attention pattern from the
captured ``qkv`` (the model's own attention cost), then per component and image the route
pooling (``H_k W_k C_k``) and the merge chain (``R_{k+1} 4C_k C_{k+1}`` per later merge, plus
``C_K d_z`` for the final map). Memory: one ``[B, H_k W_k, C_k]`` tensor per decomposed block.
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
from ..stack import ComponentStack, TokenInfo, projected_scale

if TYPE_CHECKING:
    from torch import nn

    from ..adapters.base import CapturePoint
    from ..readout import FrozenNorm

__all__ = ["MergeMap", "SwinBlockMap", "SwinMap", "SwinStageMap", "decompose_swin", "window_slots"]

log = logging.getLogger(__name__)

Granularity = Literal["layer", "head", "head_token"]
BiasMode = Literal["explicit", "anchor", "split"]


# ----------------------------------------------------------------------------- structure
@dataclass
class SwinBlockMap:
    """One Swin block ``x + WMSA(LN_1 x)``, then ``+ MLP(LN_2 x)``, as the engine needs it.

    Attributes:
        module: the block; its input is the residual stream ``[B, H, W, C]`` entering it.
        stage: stage index (0 at the input).
        index: block index within its stage.
        layer: global block index (0 at the input).
        n_heads: H.
        d_head: d_h.
        scale: softmax temperature applied to ``q k^T``.
        w_out: ``[H, d_h, C]``: head ``h`` writes ``y_h @ w_out[h]``.
        b_out: output-projection bias ``[C]`` or None.
        v_bias: value bias ``[H, d_h]`` or None.
        qkv: capture point of the qkv projection output ``[B * nW, M_h M_w, 3 H d_h]``.
        rel_bias: returns the relative position bias ``[H, M_h M_w, M_h M_w]``.
        attn_mask: ``(Hp, Wp, dtype, device) -> [nW, N_w, N_w]`` additive mask for the padded
            grid ``Hp x Wp`` (None for unshifted blocks), exactly as the module builds it.
        window_size: ``(M_h, M_w)``.
        shift_size: cyclic shift ``(s_h, s_w)`` (``(0, 0)`` for W-MSA).
        mlp_write: capture point whose output is the MLP's write ``[B, H W, C]``.
        mlp_hidden: capture point of the MLP hidden activations (input of ``fc2``), or None.
        w_mlp_out: ``[d_mlp, C]`` output projection (transposed), or None.
        b_mlp_out: ``[C]`` or None.
    """

    module: nn.Module
    stage: int
    index: int
    layer: int
    n_heads: int
    d_head: int
    scale: float
    w_out: torch.Tensor
    b_out: torch.Tensor | None
    v_bias: torch.Tensor | None
    qkv: CapturePoint
    rel_bias: Callable[[], torch.Tensor]
    attn_mask: Callable[[int, int, torch.dtype, torch.device], torch.Tensor | None]
    window_size: tuple[int, int]
    shift_size: tuple[int, int]
    mlp_write: CapturePoint
    mlp_hidden: CapturePoint | None = None
    w_mlp_out: torch.Tensor | None = None
    b_mlp_out: torch.Tensor | None = None


@dataclass
class MergeMap:
    """A patch merge ``y_q = W_red LN_m([x_{q,slot 0}; ...; x_{q,slot 3}]) + b``.

    Attributes:
        module: the merge module; its input is the previous stage's output ``[B, H, W, C]``.
        norm: the norm over ``4C`` (None for Identity).
        norm_input: capture point of the ``4C`` concat ``[B, H', W', 4C]`` the norm sees.
        reduction: ``W_red`` ``[C_out, 4C]``.
        reduction_bias: ``[C_out]`` or None.
        slot_offsets: ``(row, col)`` offset inside the 2x2 group of each ``C``-slice of the
            concat, in concat order (timm: ``(0,0), (1,0), (0,1), (1,1)``).
    """

    module: nn.Module
    norm: FrozenNorm | None
    norm_input: CapturePoint
    reduction: torch.Tensor
    reduction_bias: torch.Tensor | None
    slot_offsets: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (0, 1), (1, 1))


@dataclass
class SwinStageMap:
    """One stage: an optional leading merge, then its blocks."""

    downsample: MergeMap | None
    blocks: list[SwinBlockMap]


@dataclass
class SwinMap:
    """A hierarchical windowed transformer (Swin) as the ``"swin"`` engine sees it.

    Attributes:
        stages: input to output.
        final_norm: per-position norm after the last stage (None for Identity).
        final_input: capture point of the final norm's input ``[B, H_K, W_K, C_K]``.
        forward: the stock forward returning the representation ``[B, d_z]`` (mean over
            positions of the final norm's output).
        patch_size: ``(ph, pw)`` of the patch embedding.
        engine: ``"swin"``.
    """

    stages: list[SwinStageMap]
    final_norm: FrozenNorm | None
    final_input: CapturePoint
    forward: Callable[[torch.Tensor], torch.Tensor]
    patch_size: tuple[int, int]
    engine: str = "swin"

    @property
    def blocks(self) -> list[SwinBlockMap]:
        """Every block, input to output (global block index = list index)."""
        return [blk for stage in self.stages for blk in stage.blocks]

    def describe(self) -> dict[str, Any]:
        """Facts for tables and manifests."""
        return {
            "blocks": len(self.blocks),
            "depths": [len(st.blocks) for st in self.stages],
            "heads": [st.blocks[0].n_heads if st.blocks else 0 for st in self.stages],
            "width": [int(st.blocks[0].w_out.shape[-1]) if st.blocks else None for st in self.stages],
            "window": [list(st.blocks[0].window_size) if st.blocks else None for st in self.stages],
            "prefix_tokens": [],
            "pool": "avg",
            "token_norm": self.final_norm.kind if self.final_norm else None,
            "pooled_norm": None,
            "projection": None,
        }


def window_slots(
    h: int, w: int, window: tuple[int, int], shift: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """Grid position held by every window slot: ``[nW, M_h M_w]`` (row-major ``h * W + w``; -1: padding).

    Mirrors the block: cyclic roll by ``-shift``, zero padding at the bottom/right up to a
    multiple of the window, then the window partition.
    """
    idx = torch.arange(h * w, device=device).view(h, w)
    if any(shift):
        idx = torch.roll(idx, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    mh, mw = window
    hp, wp = -(-h // mh) * mh, -(-w // mw) * mw
    padded = torch.full((hp, wp), -1, dtype=torch.long, device=device)
    padded[:h, :w] = idx
    return padded.view(hp // mh, mh, wp // mw, mw).permute(0, 2, 1, 3).reshape(-1, mh * mw)


# ----------------------------------------------------------------------------- engine
@dataclass
class _BlockCap:
    grid: tuple[int, int] | None = None
    x_in: torch.Tensor | None = None  # [B, HW, C] (start block only)
    qkv: torch.Tensor | None = None
    mlp: torch.Tensor | None = None  # [B, HW, C]
    hidden: torch.Tensor | None = None  # [B, HW, n]
    # after the block ran:
    heads: torch.Tensor | None = None  # [B, HW, H, dh] per-query head outputs (head/layer)
    alpha: torch.Tensor | None = None  # [B*nW, H, Nw, Nw] (tokens)
    v: torch.Tensor | None = None  # [B*nW, H, Nw, dh] (tokens)
    slots: torch.Tensor | None = None  # [nW, Nw]


@dataclass
class _Pass:
    blocks: dict[int, _BlockCap] = field(default_factory=dict)
    merge_in: dict[int, torch.Tensor] = field(default_factory=dict)  # stage -> 4C concat
    merge_grid: dict[int, tuple[int, int]] = field(default_factory=dict)  # stage -> input grid
    final_in: torch.Tensor | None = None


def decompose_swin(
    smap: SwinMap,
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
    """Decompose one batch of a Swin model; see :func:`vitdecomp.decompose` for the arguments.

    Args:
        smap: the model's :class:`SwinMap`.
        pixels: ``[B, 3, H, W]``.
        granularity: ``"layer"``, ``"head"`` or ``"head_token"`` (only for blocks of the last
            stage: ``start_layer`` must lie in it; tokens are that stage's grid positions).
        start_layer: first decomposed block (global index; negative counts from the end).
        ln_mode: ``"centered"`` or ``"anchor"``.
        bias_mode: ``"explicit"``, ``"anchor"`` or ``"split"``.
        mlp_neurons: per-neuron MLP terms (``[B, d_mlp, R_k, C_k]`` per block in flight).
        directions: ``[K, d_z]``, applied before any token expansion.
        normalize: divide by ``||z||``.
        compute_dtype: dtype of the engine's own arithmetic.
        meta: recorded in the stack.

    Returns:
        ``values [comp, B, d]`` (``[comp, B, H_K W_K, d]`` for tokens), summing to ``z``.
    """
    blocks = smap.blocks
    n_layers = len(blocks)
    s0 = start_layer + n_layers if start_layer < 0 else start_layer
    if not 0 <= s0 < n_layers:
        raise InputError(f"start_layer={start_layer} is outside a model with {n_layers} blocks")
    n_stages = len(smap.stages)
    k0 = blocks[s0].stage
    last = n_stages - 1
    tokens = granularity == "head_token"
    if tokens and k0 != last:
        first_last = n_layers - len(smap.stages[last].blocks)
        raise InputError(
            f"granularity='head_token' on a Swin model splits heads by source position on one stage grid, "
            f"so it covers the blocks of the last stage only (blocks {first_last}..{n_layers - 1}); got "
            f"start_layer={start_layer} (stage {k0}). Use start_layer >= {first_last} "
            f"(e.g. start_layer={first_last - n_layers}), or granularity='head' for earlier stages."
        )
    if mlp_neurons and tokens:
        raise InputError("mlp_neurons=True is not available with granularity='head_token'")
    if any(blk.module.training for blk in blocks):
        raise InputError("the Swin model is in training mode (drop-path, dropout); call .eval() first")
    centre = ln_mode == "centered"
    dt = compute_dtype
    dirs = directions.to(device=pixels.device, dtype=dt) if directions is not None else None

    st = _Pass()

    def on_block_input(layer: int) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            cap = st.blocks.setdefault(layer, _BlockCap())
            cap.grid = (int(x.shape[1]), int(x.shape[2]))
            if layer == s0:
                cap.x_in = x.reshape(x.shape[0], -1, x.shape[-1]).to(dt).clone()

        return fn

    def store(layer: int, key: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            setattr(st.blocks.setdefault(layer, _BlockCap()), key, x.to(dt).clone())

        return fn

    def on_block_end(layer: int) -> Callable[[torch.Tensor], None]:
        def fn(_: torch.Tensor) -> None:
            cap = st.blocks[layer]
            blk = blocks[layer]
            assert cap.qkv is not None and cap.grid is not None
            alpha, v, slots = _attention(blk, cap.qkv, cap.grid, bias_mode, dt)
            cap.qkv = None
            if tokens:
                cap.alpha, cap.v, cap.slots = alpha, v, slots
            else:
                cap.heads = _to_grid(alpha @ v, slots, cap.grid)

        return fn

    def on_merge(stage: int) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            st.merge_grid[stage] = (int(x.shape[1]), int(x.shape[2]))

        return fn

    def on_merge_norm(stage: int) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            st.merge_in[stage] = x.to(dt).clone()

        return fn

    def on_final(x: torch.Tensor) -> None:
        st.final_in = x.to(dt).clone()

    specs: list[Any] = []
    for layer in range(s0, n_layers):
        blk = blocks[layer]
        specs.append((blk.module, "input", on_block_input(layer)))
        specs.append((blk.qkv.module, blk.qkv.where, store(layer, "qkv")))
        specs.append((blk.mlp_write.module, blk.mlp_write.where, store(layer, "mlp")))
        if mlp_neurons:
            if blk.mlp_hidden is None or blk.w_mlp_out is None:
                raise InputError("this model does not expose MLP hidden activations; use mlp_neurons=False")
            specs.append((blk.mlp_hidden.module, blk.mlp_hidden.where, store(layer, "hidden")))
        specs.append((blk.module, "output", on_block_end(layer)))
    for k in range(k0 + 1, n_stages):
        merge = smap.stages[k].downsample
        if merge is None:
            raise UnsupportedModelError(f"stage {k} has no patch merge; only merging stages are supported")
        specs.append((merge.module, "input", on_merge(k)))
        specs.append((merge.norm_input.module, merge.norm_input.where, on_merge_norm(k)))
    specs.append((smap.final_input.module, smap.final_input.where, on_final))

    with hooks(specs):
        reference = smap.forward(pixels)
    done = [cap for cap in st.blocks.values() if cap.heads is not None or cap.alpha is not None]
    if len(done) != n_layers - s0 or st.final_in is None or len(st.merge_in) != n_stages - 1 - k0:
        raise InputError("the model's forward did not run through its blocks; is this the right model?")
    reference = reference.to(dt)
    batch = reference.shape[0]
    dev = reference.device

    # ---- stage grids (row-major positions) from what the pass saw
    grids: dict[int, tuple[int, int]] = {last: (int(st.final_in.shape[1]), int(st.final_in.shape[2]))}
    for k in range(k0, last):
        grids[k] = st.merge_grid[k + 1]

    # ---- per-position readout scalars s_k [B, HW_k] and routes r_k [HW_k] (see module docstring)
    final = smap.final_norm
    x_f = st.final_in.reshape(batch, -1, st.final_in.shape[-1])
    n_pos = x_f.shape[1]
    mu_f: torch.Tensor | None = None
    if final is not None:
        mu_f, inv_f = final.stats(x_f)  # [B, P, 1]
        scal = {last: inv_f[..., 0] / n_pos}
    else:
        scal = {last: torch.full((batch, n_pos), 1.0 / n_pos, dtype=dt, device=dev)}
    route = {last: torch.zeros(n_pos, dtype=torch.long, device=dev)}
    n_routes = {last: 1}
    merge_stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in range(last - 1, k0 - 1, -1):
        merge = smap.stages[k + 1].downsample
        assert merge is not None
        (hk, wk), (hn, wn) = grids[k], grids[k + 1]
        if (hn, wn) != (-(-hk // 2), -(-wk // 2)):
            raise InputError(f"stage {k + 1}: merge grid {(hn, wn)} does not halve {(hk, wk)}")
        x4 = st.merge_in[k + 1].reshape(batch, hn * wn, -1)
        if merge.norm is not None:
            mu_m, inv_m = merge.norm.stats(x4)
        else:
            mu_m, inv_m = torch.zeros_like(x4[..., :1]), torch.ones_like(x4[..., :1])
        merge_stats[k + 1] = (mu_m[..., 0], inv_m[..., 0])
        ii = torch.arange(hk, device=dev)[:, None].expand(hk, wk)
        jj = torch.arange(wk, device=dev)[None, :].expand(hk, wk)
        slot_table = torch.empty(2, 2, dtype=torch.long, device=dev)
        for t, (di, dj) in enumerate(merge.slot_offsets):
            slot_table[di, dj] = t
        q = ((ii // 2) * wn + jj // 2).reshape(-1)
        slot = slot_table[ii % 2, jj % 2].reshape(-1)
        scal[k] = scal[k + 1][:, q] * inv_m[:, q, 0]
        route[k] = slot * n_routes[k + 1] + route[k + 1][q]
        n_routes[k] = 4 * n_routes[k + 1]
    # [B, R_k]: total readout weight of each route (where a constant write goes)
    sw = {k: torch.zeros(batch, n_routes[k], dtype=dt, device=dev).index_add_(1, route[k], scal[k]) for k in scal}

    def pool(rows: torch.Tensor, k: int) -> torch.Tensor:
        """Stage-``k`` writes ``[B, HW_k, *mid, C]`` -> route-pooled ``[B, *mid, R_k, C]``."""
        return _pool_positions(rows, scal[k], route[k], n_routes[k]).movedim(1, -2)

    def push(rows: torch.Tensor, k: int) -> torch.Tensor:
        """Route-pooled stage-``k`` rows ``[..., R_k, C_k]`` -> output rows ``[..., d_z or K]``."""
        for j in range(k + 1, n_stages):
            merge = smap.stages[j].downsample
            assert merge is not None
            *lead, r4, c = rows.shape
            rows = rows.reshape(*lead, 4, r4 // 4, c).movedim(-3, -2).reshape(*lead, r4 // 4, 4 * c)
            if merge.norm is not None:
                rows = merge.norm.linear(rows, centre)
            rows = rows @ merge.reduction.detach().to(dt).T
        rows = rows.squeeze(-2)
        if final is not None:
            rows = final.linear(rows, centre)
        return rows @ dirs.T if dirs is not None else rows

    def place(vec: torch.Tensor | None, k: int) -> torch.Tensor | None:
        """A constant write ``vec [C_k]`` at every position of stage ``k``: ``[B, d]`` (``[B, P, d]`` for tokens)."""
        if vec is None:
            return None
        vec = vec.detach().to(dt)
        if tokens:
            return scal[k][..., None] * push(vec[None], k)
        return push(sw[k][..., None] * vec, k)

    def rows_out(rows: torch.Tensor, k: int) -> torch.Tensor:
        """Per-position writes ``[B, HW_k, C]`` -> ``[B, d]`` (``[B, P, d]`` for tokens)."""
        if tokens:
            return push((rows * scal[k][..., None])[..., None, :], k)
        return push(pool(rows, k), k)

    # ---- the readout constant: merge betas (and -gamma mu / sigma in anchor mode), final beta
    const = torch.zeros(batch, n_pos, reference.shape[-1] if dirs is None else dirs.shape[0], dtype=dt, device=dev)
    const_total = const.new_zeros(batch, const.shape[-1])
    for j in range(k0 + 1, n_stages):
        merge = smap.stages[j].downsample
        assert merge is not None
        mu_m, inv_m = merge_stats[j]
        c4 = torch.zeros(batch, mu_m.shape[1], merge.reduction.shape[1], dtype=dt, device=dev)
        if merge.norm is not None:
            if merge.norm.bias is not None:
                c4 = c4 + merge.norm.bias.detach().to(dt)
            if not centre and merge.norm.kind == "layer":
                gamma = merge.norm.weight
                shift = (mu_m * inv_m)[..., None]
                c4 = c4 - (shift * gamma.detach().to(dt) if gamma is not None else shift)
        write = c4 @ merge.reduction.detach().to(dt).T
        if merge.reduction_bias is not None:
            write = write + merge.reduction_bias.detach().to(dt)
        const_total = const_total + push(pool(write, j), j)
    if final is not None:
        c_f = torch.zeros(batch, n_pos, x_f.shape[-1], dtype=dt, device=dev)
        if final.bias is not None:
            c_f = c_f + final.bias.detach().to(dt) / n_pos
        if not centre and final.kind == "layer":
            assert mu_f is not None
            gamma_f = final.weight.detach().to(dt) if final.weight is not None else torch.ones_like(c_f[0, 0])
            c_f = c_f - (scal[last] * mu_f[..., 0])[..., None] * gamma_f
        const = c_f @ dirs.T if dirs is not None else c_f
    if tokens:
        const = const + const_total[:, None] / n_pos
    else:
        const = const.sum(1) + const_total

    # ---- component rows
    labels: list[ComponentLabel] = [ComponentLabel("embed" if s0 == 0 else "rest")]
    first = st.blocks[s0].x_in
    assert first is not None
    rows: list[torch.Tensor] = [rows_out(first, k0)[None]]
    for layer in range(s0, n_layers):
        blk, cap = blocks[layer], st.blocks[layer]
        k = blk.stage
        where = {"stage": k, "block": blk.index}
        w_out = blk.w_out.detach().to(dt)
        if tokens:
            heads = _token_terms(cap, scal[k], push(w_out[:, :, None, :], k), batch)  # [B, H, P, K]
        elif granularity == "layer":
            assert cap.heads is not None
            heads = push(pool(torch.einsum("bphd,hde->bpe", cap.heads, w_out), k), k)[:, None]  # [B, 1, K]
        else:
            assert cap.heads is not None
            heads = push(torch.einsum("bhrd,hde->bhre", pool(cap.heads, k), w_out), k)  # [B, H, K]
        bias = place(_attn_bias(blk, bias_mode, dt), k)
        if bias is not None and bias_mode in ("anchor", "split"):
            # the block's constant, shared equally by its head rows (head x position cells for
            # tokens); with granularity="layer" the single attention row takes all of it
            if tokens:
                heads = heads + (bias.sum(1) / (heads.shape[1] * heads.shape[2]))[:, None, None, :]
            else:
                heads = heads + (bias / heads.shape[1])[:, None, :]
            bias = None
        rows.append(heads.movedim(1, 0))  # [H (1 for "layer"), B, (P,) K]
        if granularity == "layer":
            labels.append(ComponentLabel("attn", layer, **where))
        else:
            labels.extend(ComponentLabel("head", layer, head=h, **where) for h in range(blk.n_heads))
        if bias is not None:
            rows.append(bias[None])
            labels.append(ComponentLabel("bias", layer, **where))
        if mlp_neurons:
            assert cap.hidden is not None and blk.w_mlp_out is not None
            act = pool(cap.hidden[..., None], k)  # [B, n, R, 1]
            neurons = push(act * blk.w_mlp_out.detach().to(dt)[None, :, None, :], k)  # [B, n, K]
            rows.append(neurons.movedim(1, 0))
            labels.extend(ComponentLabel("neuron", layer, neuron=n, **where) for n in range(neurons.shape[1]))
            mlp_bias = place(blk.b_mlp_out, k)
            if mlp_bias is not None:
                rows.append(mlp_bias[None])
                labels.append(ComponentLabel("mlp_bias", layer, **where))
        else:
            assert cap.mlp is not None
            rows.append(rows_out(cap.mlp, k)[None])
            labels.append(ComponentLabel("mlp", layer, **where))
        st.blocks[layer] = _BlockCap()  # free what this block held
    values = torch.cat(rows, dim=0)

    if ln_mode == "anchor" or bias_mode == "split":
        values = values + const[None] / values.shape[0]
    else:
        values = torch.cat([values, const[None]], dim=0)
        labels.append(ComponentLabel("const"))

    reference_out = reference @ dirs.T if dirs is not None else reference
    if normalize:
        norm = reference.norm(dim=-1).clamp_min(torch.finfo(dt).tiny)
        values = values / norm.view(1, batch, *([1] * (values.dim() - 2)))
        reference_out = reference_out / norm[:, None]

    token_info = TokenInfo(types=("patch",) * n_pos, grid=grids[last]) if tokens else None
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
        engine="swin",
        stage_grids={str(k): list(g) for k, g in sorted(grids.items())},
        token_stage=last if tokens else None,
    )
    return ComponentStack(
        values=values,
        labels=tuple(labels),
        reference=reference_out,
        scale=projected_scale(reference, dirs, norm if normalize else None),
        space="projected" if dirs is not None else "model",
        tokens=token_info,
        meta=info,
    )


# ----------------------------------------------------------------------------- helpers
def _attention(
    blk: SwinBlockMap, qkv: torch.Tensor, grid: tuple[int, int], bias_mode: str, dt: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute a block's windowed pattern from its captured ``qkv``.

    Returns:
        ``alpha [B*nW, H, N_w, N_w]`` (query, key; relative position bias and shift mask
        inside), values ``[B*nW, H, N_w, d_h]`` without their bias (kept in ``"anchor"``
        bias mode), and the slot map ``[nW, N_w]`` of :func:`window_slots`.
    """
    h, w = grid
    slots = window_slots(h, w, blk.window_size, blk.shift_size, qkv.device)
    n_win, n_w = slots.shape
    bw = qkv.shape[0]
    q, k, v = qkv.reshape(bw, n_w, 3, blk.n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q @ k.transpose(-1, -2)) * blk.scale + blk.rel_bias().detach().to(dt)[None]
    mh, mw = blk.window_size
    mask = blk.attn_mask(-(-h // mh) * mh, -(-w // mw) * mw, dt, qkv.device)
    if mask is not None:
        logits = logits.view(-1, n_win, blk.n_heads, n_w, n_w) + mask.to(dt)[None, :, None]
        logits = logits.view(bw, blk.n_heads, n_w, n_w)
    alpha = torch.softmax(logits, dim=-1)
    if bias_mode != "anchor" and blk.v_bias is not None:
        v = v - blk.v_bias.detach().to(dt)[None, :, None, :]
    return alpha, v, slots


def _to_grid(win: torch.Tensor, slots: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-slot rows ``[B*nW, H, N_w, e]`` -> grid rows ``[B, HW, H, e]`` (padded slots dropped)."""
    n_win, n_w = slots.shape
    heads, e = win.shape[1], win.shape[-1]
    flat = win.view(-1, n_win, heads, n_w, e).permute(0, 1, 3, 2, 4).reshape(-1, n_win * n_w, heads, e)
    return flat.index_select(1, _grid_to_slot(slots, grid))


def _grid_to_slot(slots: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_slots`: the flat slot index ``[HW]`` of every grid position."""
    flat = slots.reshape(-1)
    valid = torch.nonzero(flat >= 0, as_tuple=True)[0]
    inv = torch.empty(grid[0] * grid[1], dtype=torch.long, device=slots.device)
    inv[flat[valid]] = valid
    return inv


def _pool_positions(rows: torch.Tensor, scal: torch.Tensor, route: torch.Tensor, n_routes: int) -> torch.Tensor:
    """``sum_{p: route(p) = r} s(p) rows_p``: ``[B, HW, *mid]`` -> ``[B, R, *mid]``."""
    weighted = rows * scal.view(*scal.shape, *([1] * (rows.dim() - 2)))
    out = rows.new_zeros(rows.shape[0], n_routes, *rows.shape[2:])
    return out.index_add_(1, route, weighted)


def _token_terms(cap: _BlockCap, scal: torch.Tensor, head_maps: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-source-position head terms of a last-stage block: ``[B, H, P, K]``.

    ``beta^h_s = sum_p s(p) alpha^h_{p,s}`` per window (queries weighted by their readout
    scalar), then ``beta^h_s v'_s (W_O^h Phi)``. What reaches padded sources (only a value
    bias, in ``"anchor"`` bias mode) is shared equally by the head's real positions.

    Args:
        cap: the block's captured pattern, values and slot map.
        scal: ``[B, P]`` readout scalars of the stage.
        head_maps: ``[H, d_h, K]``: ``W_O^h`` pushed through the readout.
        batch: B.
    """
    assert cap.alpha is not None and cap.v is not None and cap.slots is not None and cap.grid is not None
    slots = cap.slots
    n_win, n_w = slots.shape
    n_pos = scal.shape[1]
    s_ext = torch.cat([scal, scal.new_zeros(batch, 1)], dim=1)
    s_win = s_ext[:, torch.where(slots >= 0, slots, n_pos).reshape(-1)].reshape(batch * n_win, n_w)
    beta = torch.einsum("wq,whqs->whs", s_win, cap.alpha)  # [B*nW, H, N_w]
    terms = torch.einsum("whsd,hdk->whsk", beta[..., None] * cap.v, head_maps)  # [B*nW, H, N_w, K]
    heads = terms.shape[1]
    flat = terms.view(batch, n_win, heads, n_w, -1).permute(0, 2, 1, 3, 4).reshape(batch, heads, n_win * n_w, -1)
    inv = _grid_to_slot(slots, cap.grid)
    out = flat.index_select(2, inv)
    pad = torch.nonzero(slots.reshape(-1) < 0, as_tuple=True)[0]
    if pad.numel():
        out = out + flat.index_select(2, pad).sum(2, keepdim=True) / n_pos
    return out


def _attn_bias(blk: SwinBlockMap, bias_mode: str, dt: torch.dtype) -> torch.Tensor | None:
    """``b_O + sum_h W_O^h b_V^h`` (``b_V`` left out in anchor mode, where the values keep it)."""
    total = blk.b_out.detach().to(dt) if blk.b_out is not None else None
    if bias_mode != "anchor" and blk.v_bias is not None:
        vb = torch.einsum("hd,hde->e", blk.v_bias.detach().to(dt), blk.w_out.detach().to(dt))
        total = vb if total is None else total + vb
    return total
