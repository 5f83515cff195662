"""Direct-effect decomposition of an isotropic (pre-norm) ViT in one hooked forward pass.

The residual stream after the last block is (METHOD §2.1)

    x^L = x^{s-1} + sum_{l >= s} [ sum_h W_O^h sum_t alpha^{l,h}_{.,t} v'_t  +  b^att_l  +  m_l ],

with ``v'_t = W_V^h u_t`` (value bias removed), ``b^att_l = ls1 * (b_O + sum_h W_O^h b_V^h)``
(valid because attention rows sum to 1) and ``m_l`` the MLP write. The readout
(:mod:`vitdecomp.readout`) only looks at the pooled positions ``S`` with weights
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
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..capture import hooks
from ..errors import InputError
from ..labels import ComponentLabel
from ..stack import ComponentStack, TokenInfo

if TYPE_CHECKING:
    from ..adapters.base import BlockMap, ViTMap

__all__ = ["decompose_vit", "Granularity", "BiasMode"]

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
    """Per-block rows, in the residual basis unless ``projected`` says otherwise."""

    heads: torch.Tensor | None = None  # [B, H, d] / [B, H, N, d|K]
    heads_projected: bool = False
    heads_in_buffer: int = 0  # token stacks: this many head rows already sit in the buffer
    bias: torch.Tensor | None = None  # [B, d] / [B, N, d]
    mlp: torch.Tensor | None = None  # [B, d] / [B, N, d]
    neurons: torch.Tensor | None = None  # [B, n, d|K]
    neurons_projected: bool = False
    mlp_bias: torch.Tensor | None = None  # [B, d]


@dataclass
class _Pass:
    """Everything one decomposition pass accumulates."""

    plan: _Plan | None = None
    x_in: torch.Tensor | None = None  # [B, |S|, d]
    x_out: torch.Tensor | None = None  # [B, |S|, d]
    caps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: dict[int, _LayerOut] = field(default_factory=dict)
    stored: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    buffer: torch.Tensor | None = None  # final values of a token stack, filled in place


def decompose_vit(
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
) -> ComponentStack:
    """Decompose one batch; see :func:`vitdecomp.decompose` for the arguments.

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
    if mlp_neurons and attn_pool is not None:
        raise InputError("mlp_neurons=True is not available for attention-pooled models yet")
    centre = ln_mode == "centered"
    dt = compute_dtype

    # Image-independent linear maps, precomputed per block.
    w_out = [blk.attn.w_out.detach().to(dt) for blk in vmap.blocks]
    ls1 = [blk.ls1.detach().to(dt) if blk.ls1 is not None else None for blk in vmap.blocks]
    w_out_ls = [w if g is None else w * g for w, g in zip(w_out, ls1)]  # [H, dh, d]
    dirs = directions.detach().to(dt) if directions is not None else None

    def to_output(rows: torch.Tensor) -> torch.Tensor:
        """Token-side rows ``[B, R, ..., d]`` -> output rows ``[B, ..., d_z or K]`` (routes summed)."""
        out = readout.route_map(rows, centre, route_dim=1)
        return out @ dirs.T if dirs is not None else out

    def per_route(rows: torch.Tensor) -> torch.Tensor:
        """Weights ``[..., d]`` -> ``[R, ..., d_z or K]``, one output map per route (not summed)."""
        out = readout.route_map_each(rows, centre)
        return out @ dirs.T if dirs is not None else out

    proj_heads: dict[int, torch.Tensor] = {}
    if tokens and dirs is not None:
        proj_heads = {l: per_route(w_out_ls[l]) for l in range(s0, n_layers)}  # [R, H, dh, K]

    st = _Pass()
    # Token stacks are large ([comp, batch, token, k]): their head rows are written straight
    # into the final buffer (output basis, before the per-image scale) as each block is
    # reduced, so the peak is one copy of the result, not two.
    head_offset: dict[int, int] = {}
    n_rows = 1
    for layer in range(s0, n_layers):
        head_offset[layer] = n_rows
        n_rows += vmap.blocks[layer].attn.n_heads
        n_rows += int(bias_mode == "explicit" and _attn_bias(vmap.blocks[layer], bias_mode, dt) is not None)
        n_rows += 1  # mlp
    n_rows += int(attn_pool is not None and attn_pool.mlp_write is not None)
    const_row = not (ln_mode == "anchor" or bias_mode == "split")
    n_rows += int(const_row)

    def token_buffer(batch: int, n_tok: int, like: torch.Tensor) -> torch.Tensor:
        if st.buffer is None:
            d_in = w_out_ls[s0].shape[-1]
            width = to_output(like.new_zeros(1, readout.n_routes, d_in)).shape[-1]
            st.buffer = like.new_empty(n_rows, batch, n_tok, width)
        return st.buffer

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
            q, k, v = (t.to(dt) for t in blk.attn.qkv(caps))
            q_rows = q.index_select(2, plan.support)
            alpha = torch.softmax((q_rows @ k.transpose(-1, -2)) * blk.attn.scale, dim=-1)  # [B,H,|S|,N]
            if bias_mode != "anchor" and blk.attn.v_bias is not None:
                v = v - blk.attn.v_bias.detach().to(dt)[None, :, None, :]
            parts = (alpha, v, caps.get("mlp_write"), caps.get("mlp_hidden"))
            if plan.separable:
                st.layers[layer] = pool_block(layer, *parts, omega=plan.w_support[None, None])
            else:
                st.stored[layer] = parts

        return fn

    def pool_block(
        layer: int,
        alpha: torch.Tensor,
        v: torch.Tensor,
        mlp_rows: torch.Tensor | None,
        hidden_rows: torch.Tensor | None,
        omega: torch.Tensor,
    ) -> _LayerOut:
        """Reduce one block with position weights ``omega [B or 1, R, |S|]``."""
        plan = st.plan
        assert plan is not None
        blk = vmap.blocks[layer]
        out = _LayerOut()
        batch = alpha.shape[0]
        omega_b = omega.expand(batch, -1, -1)
        beta = torch.einsum("brs,bhst->brht", omega_b, alpha)  # [B,R,H,N]
        if tokens:
            if layer in proj_heads:
                heads = torch.einsum("brht,bhtd,rhdk->bhtk", beta, v, proj_heads[layer])
            else:
                heads = to_output(torch.einsum("brht,bhtd,hde->brhte", beta, v, w_out_ls[layer]))
            buf = token_buffer(batch, plan.n_tokens, heads)
            buf[head_offset[layer] : head_offset[layer] + heads.shape[1]] = heads.movedim(1, 0)
            out.heads_in_buffer = heads.shape[1]
            del heads
        else:
            pooled_v = torch.einsum("brht,bhtd->brhd", beta, v)
            out.heads = torch.einsum("brhd,hde->brhe", pooled_v, w_out_ls[layer])
        out.bias = _place(omega_b, _attn_bias(blk, bias_mode, dt), plan, tokens)
        if mlp_neurons:
            if hidden_rows is None or blk.w_mlp_out is None:
                raise InputError("this model does not expose MLP hidden activations; use mlp_neurons=False")
            pooled_act = torch.einsum("brs,bsn->brn", omega_b, hidden_rows)  # R == 1 here
            w_mlp = blk.w_mlp_out.detach().to(dt)
            if dirs is not None:
                out.neurons = pooled_act[..., None] * per_route(w_mlp)[None]
                out.neurons_projected = True
            else:
                out.neurons = pooled_act[..., None] * w_mlp
            b_mlp = blk.b_mlp_out.detach().to(dt) if blk.b_mlp_out is not None else None
            out.mlp_bias = _place(omega_b, b_mlp, plan, False)
        else:
            assert mlp_rows is not None
            out.mlp = _place_rows(omega_b, mlp_rows, plan, tokens)
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

    # ---- assemble rows: pooled writes -> output basis, times the per-image scale
    def finish(rows: torch.Tensor, projected: bool) -> torch.Tensor:
        out = rows if projected else to_output(rows)
        return out * scale.view(batch, *([1] * (out.dim() - 1)))

    first_w = omega if not plan.separable else w_s[None, None]
    labels: list[ComponentLabel] = [ComponentLabel("embed" if s0 == 0 else "rest")]
    writer = _Rows(st.buffer if tokens else None)
    writer.put(finish(_place_rows(first_w.expand(batch, -1, -1), st.x_in, plan, tokens), False)[None])
    for layer in range(s0, n_layers):
        out = st.layers.pop(layer)
        if out.heads_in_buffer:
            n_heads = out.heads_in_buffer
            heads = writer.next_rows(n_heads)  # [H, B, N, k], in place
            heads.mul_(scale.view(1, batch, 1, 1))
        else:
            heads = finish(out.heads, out.heads_projected).movedim(1, 0)  # [H,B,(N),k]
            n_heads = heads.shape[0]
        bias = finish(out.bias, False) if out.bias is not None else None
        if bias is not None and bias_mode in ("anchor", "split"):
            # the layer's constant, shared equally by its H heads (H*N cells for tokens)
            if tokens:
                heads += (bias.sum(1) / (n_heads * plan.n_tokens))[None, :, None, :]
            else:
                heads += (bias / n_heads)[None]
            bias = None
        if granularity == "layer":
            writer.put(heads.sum(0, keepdim=True))
            labels.append(ComponentLabel("attn", layer))
        else:
            if not out.heads_in_buffer:
                writer.put(heads)
            labels.extend(ComponentLabel("head", layer, head=h) for h in range(n_heads))
        if bias is not None:
            writer.put(bias[None])
            labels.append(ComponentLabel("bias", layer))
        if out.neurons is not None:
            writer.put(finish(out.neurons, out.neurons_projected).movedim(1, 0))
            labels.extend(ComponentLabel("neuron", layer, neuron=n) for n in range(out.neurons.shape[2]))
            if out.mlp_bias is not None:
                writer.put(finish(out.mlp_bias, False)[None])
                labels.append(ComponentLabel("mlp_bias", layer))
        else:
            assert out.mlp is not None
            writer.put(finish(out.mlp, False)[None])
            labels.append(ComponentLabel("mlp", layer))

    def at_pooled_positions(vec: torch.Tensor) -> torch.Tensor:
        """A pooled-side row ``[B, k]``, spread over the pooled tokens for token stacks."""
        if not tokens:
            return vec
        share = (w_s / w_s.sum())[None, :, None] * vec[:, None, :]
        out = vec.new_zeros(batch, plan.n_tokens, vec.shape[-1])
        out[:, plan.support] = share
        return out

    if pool_mlp is not None:
        mlp_out = readout.after_pool(pool_mlp, centre)
        mlp_out = (mlp_out @ dirs.T if dirs is not None else mlp_out) * scale[:, None]
        writer.put(at_pooled_positions(mlp_out)[None])
        labels.append(ComponentLabel("pool_mlp"))

    # ---- the readout constant: its own row, or spread over the component rows
    const_value = at_pooled_positions(const)
    if const_row:
        writer.put(const_value[None])
        labels.append(ComponentLabel("const"))
    values = writer.result()
    if not const_row:
        values += const_value[None] / values.shape[0]
    assert values.shape[0] == len(labels)

    reference_out = reference @ dirs.T if dirs is not None else reference
    if normalize:
        norm = reference.norm(dim=-1).clamp_min(torch.finfo(dt).tiny)
        values = values / norm.view(1, batch, *([1] * (values.dim() - 2)))
        reference_out = reference_out / norm[:, None]

    token_info = _token_info(vmap, pixels, plan.n_tokens) if tokens else None
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
    return ComponentStack(
        values=values,
        labels=tuple(labels),
        reference=reference_out,
        space="projected" if dirs is not None else "model",
        tokens=token_info,
        meta=info,
    )


class _Rows:
    """Collects output rows: appended to a list, or written into a preallocated buffer."""

    def __init__(self, buffer: torch.Tensor | None) -> None:
        self.buffer = buffer
        self.parts: list[torch.Tensor] = []
        self.n = 0

    def put(self, rows: torch.Tensor) -> None:
        if self.buffer is None:
            self.parts.append(rows)
        else:
            self.buffer[self.n : self.n + rows.shape[0]] = rows
        self.n += rows.shape[0]

    def next_rows(self, count: int) -> torch.Tensor:
        """The next ``count`` rows of the buffer (already filled), as a view."""
        assert self.buffer is not None
        view = self.buffer[self.n : self.n + count]
        self.n += count
        return view

    def result(self) -> torch.Tensor:
        if self.buffer is None:
            return torch.cat(self.parts, dim=0)
        assert self.n == self.buffer.shape[0], (self.n, self.buffer.shape)
        return self.buffer


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


def _place(omega: torch.Tensor, vec: torch.Tensor | None, plan: _Plan, tokens: bool) -> torch.Tensor | None:
    """A constant write ``vec [d]`` at every pooled position, weighted by ``omega [B, R, |S|]``."""
    if vec is None:
        return None
    if not tokens:
        return omega.sum(-1)[..., None] * vec  # [B, R, d]
    return _scatter(omega[..., None] * vec, plan)  # [B, R, N, d]


def _place_rows(omega: torch.Tensor, rows: torch.Tensor, plan: _Plan, tokens: bool) -> torch.Tensor:
    """Per-position writes ``rows [B, |S|, d]`` pooled per route: ``[B, R, d]`` (or ``[B, R, N, d]``)."""
    weighted = omega[..., None] * rows[:, None]  # [B, R, |S|, d]
    return _scatter(weighted, plan) if tokens else weighted.sum(2)


def _scatter(rows: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """``[..., |S|, d]`` -> ``[..., N, d]`` with zeros outside the pooled positions."""
    out = rows.new_zeros(*rows.shape[:-2], plan.n_tokens, rows.shape[-1])
    out[..., plan.support, :] = rows
    return out


def _token_info(vmap: ViTMap, pixels: torch.Tensor, n_tokens: int) -> TokenInfo:
    ph, pw = vmap.patch_size
    grid = (pixels.shape[-2] // ph, pixels.shape[-1] // pw)
    n_patch = n_tokens - vmap.n_prefix
    if grid[0] * grid[1] != n_patch:
        side = int(round(n_patch**0.5))
        grid = (side, n_patch // side) if side * (n_patch // side) == n_patch else (1, n_patch)
    return TokenInfo(types=tuple(vmap.prefix_types) + ("patch",) * n_patch, grid=grid)
