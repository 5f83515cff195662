"""SigLIP's attention-pooling (MAP) head read as an :class:`~vitdecomp.core.readout.AttentionPool`.

SigLIP's ``SiglipMultiheadAttentionPoolingHead`` computes ``a = MHA(probe, y, y)`` (one learned
query, ``torch.nn.MultiheadAttention``) and ``z = a + mlp(layernorm(a))``, where ``y`` are the
``post_layernorm``-ed tokens. It is read as an :class:`~vitdecomp.core.readout.AttentionPool`
(docs/method.md §2.4): every pool head ``r`` is one *route* ``W_V^r W_O^r`` with its frozen pattern
``softmax(q_probe^r k^r(y)^T / sqrt(d_h))``, and ``mlp(layernorm(a))`` is one non-linear leaf,
``pool_mlp``. A head built with settings the reading does not cover (several probes, separate
k/v widths, ``add_bias_kv``, ``add_zero_attn``, active dropout, extra parameters) raises
:class:`~vitdecomp.errors.UnsupportedModelError` naming the setting.

Shapes: ``probe [1, 1, d]``; ``attention.in_proj_weight [3d, d]`` (packed ``W_Q; W_K; W_V``),
``in_proj_bias [3d]``, ``out_proj`` ``d -> d_out``; with ``R`` pool heads of width
``d_h = d / R`` the routes are ``w_vo [R, d, d_out]`` (``W_V^r W_O^r``), the value and output
biases fold into ``b_vo [d_out]`` (each pattern row sums to 1), and ``pattern(y [B, N, d])``
returns the frozen pool pattern ``[B, R, N]``.

Split from :mod:`vitdecomp.core.adapters.hf_vit`: the one family-specific piece with its own
algebra (torch's packed ``nn.MultiheadAttention``), checked setting by setting.
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ..readout import AttentionPool
from .base import CapturePoint
from .hf_names import known_name

__all__ = ["siglip_attention_pool"]

# Parameters of the head outside `layernorm` and `mlp` (anything else is refused).
_POOL_HEAD_PARAMS = frozenset(
    {
        "probe",
        "attention.in_proj_weight",
        "attention.in_proj_bias",
        "attention.out_proj.weight",
        "attention.out_proj.bias",
    }
)


def siglip_attention_pool(head: Any, name: str) -> AttentionPool:
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead`` read as an :class:`AttentionPool`.

    ``a = MHA(probe, y, y)`` with ``torch.nn.MultiheadAttention`` (packed ``in_proj``,
    ``batch_first``), then ``z = a + mlp(layernorm(a))``: pool head ``r`` is the route
    ``W_V^r W_O^r``, the value and output biases form ``b_vo`` (each pool pattern sums to 1),
    and ``mlp(layernorm(a))`` is captured whole as the ``pool_mlp`` leaf.
    """
    import torch
    from torch import nn

    if known_name(head, ("SiglipMultiheadAttentionPoolingHead",)) is None:
        raise UnsupportedModelError(
            f"{name}: pooling head {type(head).__name__} is not a SiglipMultiheadAttentionPoolingHead"
        )
    probe = getattr(head, "probe", None)
    mha = getattr(head, "attention", None)
    mlp = getattr(head, "mlp", None)
    if not isinstance(probe, torch.Tensor) or not isinstance(mha, nn.MultiheadAttention) or mlp is None:
        raise UnsupportedModelError(f"{name}: expected `probe`, an nn.MultiheadAttention `attention` and an `mlp`")
    if not isinstance(getattr(head, "layernorm", None), nn.LayerNorm):
        kind = type(getattr(head, "layernorm", None)).__name__
        raise UnsupportedModelError(f"{name}.layernorm: {kind} is not a LayerNorm")
    d = int(mha.embed_dim)
    if probe.shape != (1, 1, d):
        raise UnsupportedModelError(
            f"{name}.probe: shape {tuple(probe.shape)}; only a single probe query [1, 1, {d}] is supported"
        )
    if not mha.batch_first:
        raise UnsupportedModelError(f"{name}.attention: batch_first=False (the head passes [batch, tokens, d])")
    if not getattr(mha, "_qkv_same_embed_dim", False) or mha.in_proj_weight is None:
        raise UnsupportedModelError(
            f"{name}.attention: kdim={mha.kdim} / vdim={mha.vdim} differ from embed_dim={d} "
            "(separate q/k/v projection weights are not read)"
        )
    if mha.bias_k is not None or mha.bias_v is not None:
        raise UnsupportedModelError(f"{name}.attention: add_bias_kv=True appends a learned key/value token")
    if mha.add_zero_attn:
        raise UnsupportedModelError(f"{name}.attention: add_zero_attn=True appends a zero key/value token")
    if head.training and float(mha.dropout) > 0:
        raise UnsupportedModelError(f"{name}.attention: attention dropout is active in training mode")
    for pname, _ in head.named_parameters():
        if pname not in _POOL_HEAD_PARAMS and not pname.startswith(("layernorm.", "mlp.")):
            raise UnsupportedModelError(f"{name}.{pname}: unexpected parameter in the attention-pooling head")
    out_proj = mha.out_proj
    if not isinstance(out_proj, nn.Linear) or out_proj.in_features != d:
        raise UnsupportedModelError(f"{name}.attention.out_proj: not a Linear from {d} features")
    n_heads, d_head = int(mha.num_heads), int(mha.head_dim)
    if n_heads * d_head != d:
        raise UnsupportedModelError(f"{name}.attention: {n_heads} heads of {d_head} do not make {d}")
    w_in, b_in = mha.in_proj_weight, mha.in_proj_bias  # [3d, d], [3d]
    w_q, w_k, w_v = w_in[:d], w_in[d : 2 * d], w_in[2 * d :]
    b_q, b_k, b_v = (b_in[:d], b_in[d : 2 * d], b_in[2 * d :]) if b_in is not None else (None, None, None)
    w_v_heads = w_v.reshape(n_heads, d_head, d).transpose(1, 2)  # [R, d, dh]
    w_o = out_proj.weight.T.reshape(n_heads, d_head, -1)  # [R, dh, d_out]
    b_vo = out_proj.bias
    if b_v is not None:
        vb = torch.einsum("rd,rde->e", b_v.reshape(n_heads, d_head), w_o)
        b_vo = vb if b_vo is None else b_vo + vb
    scale = d_head**-0.5  # torch's multi_head_attention_forward: q * sqrt(1 / head_dim)

    def pattern(y: torch.Tensor) -> torch.Tensor:
        b, n, _ = y.shape
        bq = None if b_q is None else b_q.to(y.dtype)
        q = nn.functional.linear(probe.reshape(1, d).to(y.dtype), w_q.to(y.dtype), bq)
        k = nn.functional.linear(y, w_k.to(y.dtype), None if b_k is None else b_k.to(y.dtype))
        q = q.reshape(1, n_heads, 1, d_head)  # [1, R, 1, dh]
        k = k.reshape(b, n, n_heads, d_head).transpose(1, 2)  # [B, R, N, dh]
        return torch.softmax((q * scale) @ k.transpose(-1, -2), dim=-1)[:, :, 0]  # [B, R, N]

    return AttentionPool(
        w_vo=w_v_heads @ w_o,
        b_vo=b_vo,
        pattern=pattern,
        mlp_write=CapturePoint(mlp, "output", "pool_mlp"),
        pooled=CapturePoint(head, "output", "pooled"),
    )
