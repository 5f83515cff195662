"""Direct-effect decomposition of an isotropic (pre-norm) ViT in one hooked forward pass.

The residual stream after the last block is (docs/method.md §2.1)

    x^L = x^{s-1} + sum_{l >= s} [ sum_h W_O^h sum_t alpha^{l,h}_{.,t} v'_t  +  b^att_l  +  m_l ],

with ``v'_t = W_V^h u_t`` (value bias removed), ``b^att_l = ls1 * (b_O + sum_h W_O^h b_V^h)``
(valid because attention rows sum to 1) and ``m_l`` the MLP write. The readout
(:mod:`vitdecomp.core.readout`) only looks at the pooled positions ``S`` with weights
``omega_p = w_p / sigma_p``, so for a head only the pooled pattern

    beta^{l,h}_t = sum_{p in S} omega_p alpha^{l,h}_{p,t}                   [batch, H, N]

is needed: queries of the rows in ``S`` only (one row for CLS pooling), never the
``[batch, query, key, head, d]`` tensor. Head terms are ``(beta v') W_O^h``; token terms
``beta_t v'_t W_O^h`` (projected onto the requested directions *before* expanding over tokens).

When ``omega`` does not depend on statistics that are only known at the end of the pass
(no per-token norm, or a single pooled position), each block is reduced inside its hook
and nothing of it is kept; otherwise the pooled-row patterns are kept until the end.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..capture import hooks
from ...errors import InputError
from ..labels import ComponentLabel
from ..stack import ComponentStack, TokenInfo, projected_scale

if TYPE_CHECKING:
    from ..adapters.base import BlockMap, ViTMap

__all__ = ["decompose_vit", "decompose_vit_parts", "Granularity", "BiasMode"]

log = logging.getLogger(__name__)

Granularity = Literal["layer", "head", "head_token"]
BiasMode = Literal["explicit", "anchor", "split"]


@dataclass
class _Plan:
    n_tokens: int
    support: torch.Tensor  # [|S|] long
    w_support: torch.Tensor  # [|S|]
    separable: bool


@dataclass
class _LayerOut:
    """One block reduced to its pooled rows (token side, before the readout map)."""

    heads: torch.Tensor | None = None  # [B, H, k] in the output basis (head/layer granularity)
    beta: torch.Tensor | None = None  # [B, R, H, N] pooled patterns (token stacks)
    v: torch.Tensor | None = None  # [B, H, N, dh] values without bias (token stacks)
    bias: _Placed | None = None  # the attention constants at the pooled positions
    mlp: _Placed | None = None  # the MLP writes at the pooled positions
    neurons: torch.Tensor | None = None  # [B, n, k] in the output basis
    mlp_bias: _Placed | None = None


@dataclass
class _Placed:
    """Writes at the pooled positions, weighted lazily: ``omega [B, R, |S|]`` times either a
    constant ``data [d]`` (``const``) or per-position rows ``data [B, |S|, d]``."""

    omega: torch.Tensor
    data: torch.Tensor
    const: bool


@dataclass
class _Pass:
    """Everything one decomposition pass accumulates."""

    plan: _Plan | None = None
    x_in: torch.Tensor | None = None  # [B, |S|, d]
    x_out: torch.Tensor | None = None  # [B, |S|, d]
    caps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: dict[int, _LayerOut] = field(default_factory=dict)
    stored: dict[int, tuple[Any, ...]] = field(default_factory=dict)


@dataclass
class _Item:
    """Rows of the result: their labels and a function writing them into ``dest [n, B, (N), k]``."""

    labels: list[ComponentLabel]
    fill: Callable[[torch.Tensor], None]


@dataclass
class _Prepared:
    """A finished pass: everything needed to write the result, in groups (one part each)."""

    groups: list[list[_Item]]  # the embedding/rest | one per block | readout terms
    reference: torch.Tensor  # [B, k]
    row_shape: tuple[int, ...]  # (B, [N,] k)
    dtype: torch.dtype
    device: torch.device
    spread: torch.Tensor | None  # added to every row (the readout constant, when it has no row)
    norm: torch.Tensor | None  # [B] divisor (normalize=True)
    scale: torch.Tensor | None  # [B] error yardstick of a projected stack (||z|| ||U||_2 / norm)
    space: str
    tokens: TokenInfo | None
    meta: dict[str, Any]

    @property
    def n_rows(self) -> int:
        return sum(len(item.labels) for group in self.groups for item in group)

    def alloc(self, n: int) -> torch.Tensor:
        return torch.empty(n, *self.row_shape, dtype=self.dtype, device=self.device)

    def fill(self, group: list[_Item], dest: torch.Tensor) -> list[ComponentLabel]:
        """Write one group's rows into ``dest`` (exactly its size); return their labels."""
        labels: list[ComponentLabel] = []
        for item in group:
            n = len(item.labels)
            rows = dest[len(labels) : len(labels) + n]
            item.fill(rows)
            labels.extend(item.labels)
        assert len(labels) == dest.shape[0]
        if self.spread is not None:
            dest += self.spread[None]
        if self.norm is not None:
            dest /= self.norm.view(1, -1, *([1] * (dest.dim() - 2)))
        return labels

    def stack(self, values: torch.Tensor, labels: list[ComponentLabel], meta: dict[str, Any]) -> ComponentStack:
        return ComponentStack(
            values=values, labels=tuple(labels), reference=self.reference, space=self.space, tokens=self.tokens,
            meta=meta, scale=self.scale,
        )


def decompose_vit(vmap: ViTMap, pixels: torch.Tensor, **options: Any) -> ComponentStack:
    """Decompose one batch; see :func:`vitdecomp.decompose` for the arguments.

    Token stacks are written group by group into one preallocated ``[comp, batch, token, k]``
    buffer, so the peak is one copy of the result plus one block's pooled values.
    """
    prep = _run(vmap, pixels, **options)
    values = prep.alloc(prep.n_rows)
    labels: list[ComponentLabel] = []
    for group in prep.groups:
        n = sum(len(item.labels) for item in group)
        labels.extend(prep.fill(group, values[len(labels) : len(labels) + n]))
    return prep.stack(values, labels, prep.meta)


def decompose_vit_parts(vmap: ViTMap, pixels: torch.Tensor, **options: Any) -> Iterator[ComponentStack | None]:
    """The same decomposition, one part at a time (a generator).

    The first ``next()`` runs the hooked forward pass and everything that reads the model,
    then yields ``None``; after that the model is no longer used (it may be restored or
    changed). Each following item is a :class:`ComponentStack` holding some of the rows
    (the embedding or ``rest`` term; then each block's heads, bias and MLP; then the readout
    terms), with the full ``reference``; concatenated they are exactly the stack
    :func:`decompose_vit` returns. Only one part is alive at a time unless the consumer
    keeps them, so token stacks of any size stream in the memory of one block.
    """
    prep = _run(vmap, pixels, **options)
    yield None
    n_parts = len(prep.groups)
    n_total = prep.n_rows
    groups, prep.groups = prep.groups, []
    for index in range(n_parts):
        group, groups[index] = groups[index], []  # a delivered block's pooled values are freed
        n = sum(len(item.labels) for item in group)
        values = prep.alloc(n)
        labels = prep.fill(group, values)
        del group
        meta = dict(prep.meta, part=index, n_parts=n_parts, n_components_total=n_total)
        part = prep.stack(values, labels, meta)
        del values
        yield part
        del part  # hold nothing of a delivered part while the next one is built


def _run(
    vmap: ViTMap,
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
) -> _Prepared:
    """The hooked forward and every model-dependent quantity; rows are written later.

    Internally every pooled quantity carries a *route* axis ``R`` (dim 1): the pool heads of
    an attention pool, or a single route for CLS/mean pooling.
    """
    n_layers = len(vmap.blocks)
    s0 = _resolve_start(start_layer, n_layers)
    readout = vmap.readout
    attn_pool = readout.attn_pool
    tokens = granularity == "head_token"
    if mlp_neurons and tokens:
        raise InputError("mlp_neurons=True is not available with granularity='head_token'")
    centre = ln_mode == "centered"
    dt = compute_dtype

    # Image-independent linear maps, precomputed so rows can be written after the model is
    # restored: out_map [R, d, k] is the readout's linear part per route (then the directions).
    w_out = [blk.attn.w_out.detach().to(dt) for blk in vmap.blocks]
    ls1 = [blk.ls1.detach().to(dt) if blk.ls1 is not None else None for blk in vmap.blocks]
    w_out_ls = [w if g is None else w * g for w, g in zip(w_out, ls1)]  # [H, dh, d]
    dirs = directions.detach().to(dt) if directions is not None else None
    d_model = w_out_ls[s0].shape[-1]
    eye = torch.eye(d_model, dtype=dt, device=w_out_ls[s0].device)
    out_map = readout.route_map_each(eye, centre)  # [R, d, d_z]
    if dirs is not None:
        if dirs.shape[-1] != out_map.shape[-1]:
            raise InputError(f"directions have dimension {dirs.shape[-1]}, the output has {out_map.shape[-1]}")
        out_map = out_map @ dirs.T  # [R, d, K]
    width = out_map.shape[-1]

    def to_output(rows: torch.Tensor) -> torch.Tensor:
        """Token-side rows ``[B, R, ..., d]`` -> output rows ``[B, ..., k]`` (routes summed)."""
        if out_map.shape[0] == 1:
            return rows.squeeze(1) @ out_map[0]
        return torch.einsum("br...d,rdk->b...k", rows, out_map)

    def head_map(layer: int) -> torch.Tensor:
        """Token stacks: per-head maps ``[R, H, dh, k]`` (built when the block's rows are written)."""
        return torch.einsum("hde,rek->rhdk", w_out_ls[layer], out_map)

    st = _Pass()

    def plan_for(x: torch.Tensor) -> _Plan:
        if st.plan is None:
            n = x.shape[1]
            w = readout.weights(n, dtype=dt, device=x.device)
            support = torch.nonzero(w, as_tuple=True)[0]
            st.plan = _Plan(n, support, w[support], readout.separable(len(support)))
        return st.plan

    def on_block_input(x: torch.Tensor) -> None:
        plan = plan_for(x)
        st.x_in = x.index_select(1, plan.support).to(dt).clone()

    def on_last_output(x: torch.Tensor) -> None:
        st.x_out = x.index_select(1, plan_for(x).support).to(dt).clone()

    def capture(layer: int, key: str, rows_only: bool) -> Any:
        def fn(x: torch.Tensor) -> None:
            if rows_only:
                x = x.index_select(1, plan_for(x).support).to(dt).clone()
            st.caps.setdefault(layer, {})[key] = x

        return fn

    def on_block_end(layer: int) -> Any:
        def fn(_: torch.Tensor) -> None:
            caps = st.caps.pop(layer)
            plan = st.plan
            assert plan is not None
            blk = vmap.blocks[layer]
            if blk.attn.qkv_rows is not None:
                q_rows, k, v = (t.to(dt) for t in blk.attn.qkv_rows(caps, plan.support))
            else:
                q, k, v = (t.to(dt) for t in blk.attn.qkv(caps))
                q_rows = q.index_select(2, plan.support)
            alpha = torch.softmax((q_rows @ k.transpose(-1, -2)) * blk.attn.scale, dim=-1)  # [B,H,|S|,N]
            if bias_mode != "anchor" and blk.attn.v_bias is not None:
                v = v - blk.attn.v_bias.detach().to(dt)[None, :, None, :]
            mlp_rows, hidden = caps.get("mlp_write"), caps.get("mlp_hidden")
            if plan.separable:
                st.layers[layer] = pool_block(layer, alpha, v, mlp_rows, hidden, omega=plan.w_support[None, None])
            elif tokens:
                st.stored[layer] = (alpha, v, mlp_rows, hidden)  # [B,H,|S|,N]: token terms need the pattern
            else:  # keep the heads' outputs at the pooled positions, not the pattern (|S| x dh << |S| x N)
                st.stored[layer] = (None, alpha @ v, mlp_rows, hidden)

        return fn

    def pool_block(
        layer: int,
        alpha: torch.Tensor | None,
        v: torch.Tensor,
        mlp_rows: torch.Tensor | None,
        hidden_rows: torch.Tensor | None,
        omega: torch.Tensor,
    ) -> _LayerOut:
        """Reduce one block with position weights ``omega [B or 1, R, |S|]``.

        ``alpha [B, H, |S|, N]`` and ``v [B, H, N, dh]``; or ``alpha=None`` and ``v`` the heads'
        outputs at the pooled positions ``z = alpha v  [B, H, |S|, dh]`` (head/layer granularity).
        """
        plan = st.plan
        assert plan is not None
        blk = vmap.blocks[layer]
        out = _LayerOut()
        batch = v.shape[0]
        omega_b = omega.expand(batch, -1, -1)
        if alpha is None:
            pooled_v = torch.einsum("brs,bhsd->brhd", omega_b, v)
            out.heads = to_output(torch.einsum("brhd,hde->brhe", pooled_v, w_out_ls[layer]))  # [B,H,k]
        elif tokens:
            out.beta = torch.einsum("brs,bhst->brht", omega_b, alpha)  # [B,R,H,N]
            out.v = v  # expanded over tokens when the rows are written
        else:
            beta = torch.einsum("brs,bhst->brht", omega_b, alpha)  # [B,R,H,N]
            pooled_v = torch.einsum("brht,bhtd->brhd", beta, v)
            out.heads = to_output(torch.einsum("brhd,hde->brhe", pooled_v, w_out_ls[layer]))  # [B,H,k]
        out.bias = _place(omega_b, _attn_bias(blk, bias_mode, dt), tokens)
        if mlp_neurons:
            if hidden_rows is None or blk.w_mlp_out is None:
                raise InputError("this model does not expose MLP hidden activations; use mlp_neurons=False")
            pooled_act = torch.einsum("brs,bsn->brn", omega_b, hidden_rows)  # [B,R,n]
            neuron_map = torch.einsum("nd,rdk->rnk", blk.w_mlp_out.detach().to(dt), out_map)
            out.neurons = torch.einsum("brn,rnk->bnk", pooled_act, neuron_map)  # [B,n,k]
            b_mlp = blk.b_mlp_out.detach().to(dt) if blk.b_mlp_out is not None else None
            out.mlp_bias = _place(omega_b, b_mlp, False)
        else:
            assert mlp_rows is not None
            out.mlp = _place_rows(omega_b, mlp_rows, tokens)
        return out

    specs: list[Any] = [(vmap.blocks[s0].module, "input", on_block_input)]
    for layer in range(s0, n_layers):
        blk = vmap.blocks[layer]
        for cp in blk.attn.captures:
            specs.append((cp.module, cp.where, capture(layer, cp.key, rows_only=False)))
        specs.append((blk.mlp_write.module, blk.mlp_write.where, capture(layer, "mlp_write", True)))
        if mlp_neurons and blk.mlp_hidden is not None:
            hp = blk.mlp_hidden
            specs.append((hp.module, hp.where, capture(layer, "mlp_hidden", True)))
        specs.append((blk.module, "output", on_block_end(layer)))
    specs.append((vmap.blocks[-1].module, "output", on_last_output))
    pool_caps: dict[str, torch.Tensor] = {}
    if attn_pool is not None:
        for key, cp in (("pool_mlp", attn_pool.mlp_write), ("pooled", attn_pool.pooled)):
            if cp is not None:
                specs.append((cp.module, cp.where, lambda x, key=key: pool_caps.__setitem__(key, x.to(dt).clone())))

    with hooks(specs):
        reference = vmap.forward(pixels)
    if st.plan is None or st.x_out is None or st.x_in is None or len(st.layers) + len(st.stored) != n_layers - s0:
        raise InputError("the model's forward did not run through its blocks; is this the right model?")
    plan = st.plan
    reference = reference.to(dt)
    batch = reference.shape[0]

    # ---- frozen readout statistics from the captured last-block rows
    x_out = st.x_out  # [B, |S|, d]
    w_s = plan.w_support
    scale = torch.ones(batch, dtype=dt, device=x_out.device)  # per-image scalar of the readout
    const = torch.zeros(batch, x_out.shape[-1], dtype=dt, device=x_out.device)
    tn = readout.token_norm
    normed = tn.apply(x_out) if tn is not None else x_out
    if tn is not None:
        mu_p, inv_p = tn.stats(x_out)  # [B,|S|,1]
    if attn_pool is not None:
        route_w = attn_pool.pattern(normed).to(dt)  # [B,R,|S|]
    else:
        route_w = w_s[None, None].expand(batch, 1, -1)
    omega = route_w * inv_p[..., 0][:, None] if tn is not None else route_w  # [B,R,|S|]
    if tn is not None:
        if tn.bias is not None:
            const = const + tn.bias.detach().to(dt)  # pooling weights of each route sum to 1
        if not centre:
            gamma1 = tn.weight.detach().to(dt) if tn.weight is not None else torch.ones_like(const[0])
            shift = torch.einsum("brs,bs->br", omega, mu_p[..., 0])  # [B,R]
            const = const[:, None] - shift[..., None] * gamma1  # [B,R,d]
        if plan.separable:
            scale = scale * inv_p[:, 0, 0]
    if const.dim() == 2:  # beta_1 reaches the output once through every route
        const = const[:, None].expand(batch, readout.n_routes, -1)
    # const is now per route [B,R,d] on the token side; map it through the routes
    if attn_pool is not None:
        const = torch.einsum("brd,rde->be", const, attn_pool.w_vo.detach().to(dt))
        if attn_pool.b_vo is not None:
            const = const + attn_pool.b_vo.detach().to(dt)
        pooled = pool_caps["pooled"].reshape(batch, -1)
    else:
        const = const.sum(1)
        pooled = torch.einsum("s,bsd->bd", w_s, normed)
    if not plan.separable:
        for layer, parts in sorted(st.stored.items()):
            st.layers[layer] = pool_block(layer, *parts, omega=omega)
        st.stored.clear()
    pool_mlp = pool_caps["pool_mlp"].reshape(batch, -1) if "pool_mlp" in pool_caps else None
    if readout.pooled_norm is not None:
        mu2, inv2 = readout.pooled_norm.stats(pooled)
        if centre:
            const = readout.pooled_norm.linear(const, True) * inv2
        else:
            const = readout.pooled_norm.linear(const - mu2, False) * inv2
        if readout.pooled_norm.bias is not None:
            const = const + readout.pooled_norm.bias.detach().to(dt)
        scale = scale * inv2[:, 0]
    if readout.proj is not None:
        const = const @ readout.proj.detach().to(dt)
    if readout.proj_bias is not None:
        const = const + readout.proj_bias.detach().to(dt)
    if dirs is not None:
        const = const @ dirs.T
    if pool_mlp is not None:
        pool_mlp_out = readout.after_pool(pool_mlp, centre)
        pool_mlp_out = pool_mlp_out @ dirs.T if dirs is not None else pool_mlp_out
    # ---- nothing below reads the model: rows are written from the tensors above

    n_tok = plan.n_tokens
    scale_b = scale.view(batch, 1, 1) if tokens else scale.view(batch, 1)

    def finish(placed: _Placed, dest: torch.Tensor) -> None:
        """Pooled-position writes through the readout -> ``dest [B, (N,) k]`` (times the scale)."""
        om = placed.omega
        if placed.const:  # sum_r omega_{b,r,s} (vec A_r): map the constant once per route
            vec_map = torch.einsum("d,rdk->rk", placed.data, out_map)
            out = torch.einsum("brs,rk->bsk", om, vec_map) if tokens else torch.einsum("brs,rk->bk", om, vec_map)
        elif tokens:
            out = to_output(om[..., None] * placed.data[:, None])  # [B, |S|, k]
        else:
            out = to_output(torch.einsum("brs,bsd->brd", om, placed.data))
        out = out * scale_b
        if tokens:
            dest.zero_()
            dest[:, plan.support] = out
        else:
            dest.copy_(out)

    def at_pooled_positions(vec: torch.Tensor, dest: torch.Tensor) -> None:
        """A pooled-side row ``vec [B, k]`` into ``dest [B, (N,) k]`` (spread over pooled tokens)."""
        if not tokens:
            dest.copy_(vec)
            return
        dest.zero_()
        dest[:, plan.support] = (w_s / w_s.sum())[None, :, None] * vec[:, None, :]

    first_w = (omega if not plan.separable else w_s[None, None]).expand(batch, -1, -1)
    first = _place_rows(first_w, st.x_in, tokens)
    groups: list[list[_Item]] = [[_Item([ComponentLabel("embed" if s0 == 0 else "rest")], lambda d: finish(first, d[0]))]]
    for layer in range(s0, n_layers):
        groups.append(_block_items(layer, st.layers.pop(layer), granularity, bias_mode, finish, head_map, scale, n_tok))
    tail: list[_Item] = []
    if pool_mlp is not None:
        pool_row = pool_mlp_out * scale[:, None]
        tail.append(_Item([ComponentLabel("pool_mlp")], lambda d: at_pooled_positions(pool_row, d[0])))
    const_row = not (ln_mode == "anchor" or bias_mode == "split")
    if const_row:
        tail.append(_Item([ComponentLabel("const")], lambda d: at_pooled_positions(const, d[0])))
    if tail:
        groups.append(tail)
    row_shape = (batch, n_tok, width) if tokens else (batch, width)
    prep = _Prepared(
        groups=groups,
        reference=reference @ dirs.T if dirs is not None else reference,
        row_shape=row_shape,
        dtype=dt,
        device=reference.device,
        spread=None,
        norm=None,
        scale=projected_scale(reference, dirs),
        space="projected" if dirs is not None else "model",
        tokens=token_info(vmap, pixels, n_tok) if tokens else None,
        meta={},
    )
    if not const_row:  # the readout constant, shared equally by every row
        spread = prep.alloc(1)[0]
        at_pooled_positions(const, spread)
        prep.spread = spread / prep.n_rows
    if normalize:
        prep.norm = reference.norm(dim=-1).clamp_min(torch.finfo(dt).tiny)
        prep.reference = prep.reference / prep.norm[:, None]
        prep.scale = projected_scale(reference, dirs, prep.norm)
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
    )
    prep.meta = info
    return prep


def _block_items(
    layer: int,
    out: _LayerOut,
    granularity: str,
    bias_mode: str,
    finish: Callable[[_Placed, torch.Tensor], None],
    head_map: Callable[[int], torch.Tensor],
    scale: torch.Tensor,
    n_tok: int,
) -> list[_Item]:
    """One block's rows: heads (or the layer's attention sum), its bias, its MLP or neurons."""
    tokens = out.beta is not None
    n_heads = out.beta.shape[2] if out.beta is not None else out.heads.shape[1]  # type: ignore[union-attr]
    fold_bias = out.bias is not None and bias_mode in ("anchor", "split")

    def heads_into(dest: torch.Tensor) -> None:
        """``dest [H, B, (N,) k]``: the heads' rows, with the layer constant folded in if asked."""
        if tokens:
            _expand_token_heads(out.beta, out.v, head_map(layer), scale, dest)  # type: ignore[arg-type]
        else:
            dest.copy_(out.heads.movedim(1, 0) * scale.view(1, -1, 1))  # type: ignore[union-attr]
        if fold_bias:  # the layer's constant, shared equally by its H heads (H*N cells for tokens)
            bias = torch.empty_like(dest[0])
            finish(out.bias, bias)  # type: ignore[arg-type]
            if tokens:
                dest += (bias.sum(1) / (n_heads * n_tok))[None, :, None, :]
            else:
                dest += (bias / n_heads)[None]

    items: list[_Item] = []
    if granularity == "layer":

        def layer_into(dest: torch.Tensor) -> None:
            heads = torch.empty(n_heads, *dest.shape[1:], dtype=dest.dtype, device=dest.device)
            heads_into(heads)
            torch.sum(heads, dim=0, keepdim=True, out=dest)

        items.append(_Item([ComponentLabel("attn", layer)], layer_into))
    else:
        items.append(_Item([ComponentLabel("head", layer, head=h) for h in range(n_heads)], heads_into))
    if out.bias is not None and not fold_bias:
        items.append(_Item([ComponentLabel("bias", layer)], lambda d: finish(out.bias, d[0])))  # type: ignore[arg-type]
    if out.neurons is not None:
        neurons = out.neurons
        n = neurons.shape[1]
        items.append(
            _Item(
                [ComponentLabel("neuron", layer, neuron=i) for i in range(n)],
                lambda d: d.copy_(neurons.movedim(1, 0) * scale.view(1, -1, 1)),
            )
        )
        if out.mlp_bias is not None:
            items.append(_Item([ComponentLabel("mlp_bias", layer)], lambda d: finish(out.mlp_bias, d[0])))  # type: ignore[arg-type]
    else:
        assert out.mlp is not None
        items.append(_Item([ComponentLabel("mlp", layer)], lambda d: finish(out.mlp, d[0])))  # type: ignore[arg-type]
    return items


def _expand_token_heads(
    beta: torch.Tensor, v: torch.Tensor, maps: torch.Tensor, scale: torch.Tensor, dest: torch.Tensor
) -> None:
    """Per-head, per-source-token terms ``scale_b * sum_r beta^r_{b,h,t} v_{b,h,t} M^r_h``.

    Args:
        beta: pooled patterns ``[B, R, H, N]``.
        v: values without their bias ``[B, H, N, dh]``.
        maps: ``[R, H, dh, k]`` = ``W_O^h`` then the readout route ``r`` (and the directions).
        scale: per-image readout scalar ``[B]``.
        dest: ``[H, B, N, k]``, written in place with one batched matmul per block.
    """
    b, r, h, n = beta.shape
    dh, k = maps.shape[2], maps.shape[3]
    weighted = beta.unsqueeze(-1) * v.unsqueeze(1)  # [B,R,H,N,dh]
    lhs = weighted.permute(2, 0, 3, 1, 4).reshape(h, b * n, r * dh)
    rhs = maps.permute(1, 0, 2, 3).reshape(h, r * dh, k)
    if dest.is_contiguous():
        torch.bmm(lhs, rhs, out=dest.view(h, b * n, k))
    else:
        dest.copy_(torch.bmm(lhs, rhs).view(h, b, n, k))
    dest.mul_(scale.view(1, b, 1, 1))


def _resolve_start(start_layer: int, n_layers: int) -> int:
    s0 = start_layer + n_layers if start_layer < 0 else start_layer
    if not 0 <= s0 < n_layers:
        raise InputError(f"start_layer={start_layer} is outside a model with {n_layers} blocks")
    return s0


def _attn_bias(blk: BlockMap, bias_mode: str, dt: torch.dtype) -> torch.Tensor | None:
    """``ls1 * (b_O + sum_h W_O^h b_V^h)`` (``b_V`` left out in anchor mode, where v keeps it)."""
    attn = blk.attn
    total = None
    if attn.b_out is not None:
        total = attn.b_out.detach().to(dt)
    if bias_mode != "anchor" and attn.v_bias is not None:
        vb = torch.einsum("hd,hde->e", attn.v_bias.detach().to(dt), attn.w_out.detach().to(dt))
        total = vb if total is None else total + vb
    if total is not None and blk.ls1 is not None:
        total = total * blk.ls1.detach().to(dt)
    return total


def _place(omega: torch.Tensor, vec: torch.Tensor | None, tokens: bool) -> _Placed | None:
    """A constant write ``vec [d]`` at every pooled position, weighted by ``omega [B, R, |S|]``."""
    return None if vec is None else _Placed(omega, vec, const=True)


def _place_rows(omega: torch.Tensor, rows: torch.Tensor, tokens: bool) -> _Placed:
    """Per-position writes ``rows [B, |S|, d]`` weighted by ``omega [B, R, |S|]`` (kept per
    pooled position for token stacks; scattered to all N tokens after the readout map)."""
    return _Placed(omega, rows, const=False)


def token_info(vmap: ViTMap, pixels: torch.Tensor, n_tokens: int) -> TokenInfo:
    ph, pw = vmap.patch_size
    grid = (pixels.shape[-2] // ph, pixels.shape[-1] // pw)
    n_patch = n_tokens - vmap.n_prefix
    if grid[0] * grid[1] != n_patch:
        side = int(round(n_patch**0.5))
        grid = (side, n_patch // side) if side * (n_patch // side) == n_patch else (1, n_patch)
    return TokenInfo(types=tuple(vmap.prefix_types) + ("patch",) * n_patch, grid=grid)
