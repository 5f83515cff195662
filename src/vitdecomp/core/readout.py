"""Frozen linear readouts: the model's final norm, pooling and projection as linear maps.

With the statistics (mu, sigma) of a LayerNorm frozen at their actual values,

    LN(v) = gamma * (v - mu 1) / sigma + beta = gamma * (Pi v) / sigma + beta,   Pi = I - 1 1^T / d,

is affine in ``v``, so it can be applied to each component of ``v = sum_i v_i`` separately
(docs/method.md §2.2). Two conventions for where the constants go:

* ``"centered"`` (default, §2.2 B): every component is centred, ``gamma * Pi v_i / sigma``;
  beta and the projection bias form one explicit ``bias`` row. Token terms sum to head terms.
* ``"anchor"`` (§2.2 A): components are not centred, ``gamma * v_i / sigma``; the whole
  readout constant (``-gamma mu / sigma``, beta, projection bias) is split equally over the
  K component cells, as the published code does. Depends on the granularity through K.

A ViT readout is: optional per-token norm -> pooling over tokens with fixed weights
``w`` (CLS one-hot, mean over patches, ...) -> optional pooled norm (``fc_norm``,
CLIP ``post_layernorm``) -> optional projection ``P`` (``[d, d_z]``) and bias. Written for one
image with position weights ``omega_p = w_p / sigma_p`` (``w_p`` without a per-token norm),
the linear part is

    z_lin(c) = (sum_p omega_p c_p) @ A / sigma_pooled,      A = [Pi] G_1 [Pi] G_2 P,

so each component needs only its pooled residual write ``sum_p omega_p c_p`` (``[d]``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["FrozenNorm", "ViTReadout", "AttentionPool", "LnMode"]

LnMode = Literal["centered", "anchor"]


@dataclass(frozen=True)
class FrozenNorm:
    """A LayerNorm or RMSNorm read from a module, applied with frozen statistics.

    Attributes:
        kind: ``"layer"`` (centres, then scales) or ``"rms"`` (scales only).
        weight: gamma ``[d]`` or None.
        bias: beta ``[d]`` or None.
        eps: the module's own epsilon.
        name: the module's path, for messages.
    """

    kind: Literal["layer", "rms"]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    name: str

    @classmethod
    def from_module(cls, module: nn.Module | None, name: str) -> FrozenNorm | None:
        """Read a norm module; ``None`` for Identity; raises for anything else."""
        from torch import nn

        if module is None or isinstance(module, nn.Identity):
            return None
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                raise UnsupportedModelError(f"{name}: LayerNorm over {module.normalized_shape} is not supported")
            return cls("layer", module.weight, module.bias, float(module.eps), name)
        type_name = type(module).__name__
        if type_name in ("RmsNorm", "RMSNorm", "LlamaRMSNorm", "T5LayerNorm") or isinstance(
            module, getattr(nn, "RMSNorm", ())
        ):
            eps = getattr(module, "eps", None)
            if eps is None:
                eps = getattr(module, "variance_epsilon", None)
            if eps is None:
                raise UnsupportedModelError(f"{name}: {type_name} without a readable epsilon")
            return cls("rms", getattr(module, "weight", None), None, float(eps), name)
        raise UnsupportedModelError(
            f"{name}: normalisation {type_name} is not a LayerNorm/RMSNorm vitdecomp can freeze"
        )

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen statistics of ``x [..., d]``: mean ``[..., 1]`` (0 for RMS) and 1/sigma ``[..., 1]``."""
        import torch

        if self.kind == "layer":
            mu = x.mean(dim=-1, keepdim=True)
            var = (x - mu).pow(2).mean(dim=-1, keepdim=True)
        else:
            mu = torch.zeros_like(x[..., :1])
            var = x.pow(2).mean(dim=-1, keepdim=True)
        return mu, torch.rsqrt(var + self.eps)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The norm itself (for reconstructing the pooled vector from captured tokens)."""
        mu, inv = self.stats(x)
        y = (x - mu) * inv
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def linear(self, rows: torch.Tensor, centre: bool) -> torch.Tensor:
        """gamma * [Pi] rows (no 1/sigma: that is a per-image scalar applied by the caller)."""
        if centre and self.kind == "layer":
            rows = rows - rows.mean(dim=-1, keepdim=True)
        if self.weight is not None:
            rows = rows * self.weight.to(rows.dtype)
        return rows


@dataclass(frozen=True)
class ViTReadout:
    """The path from the last block's tokens to the representation, as data.

    Attributes:
        token_norm: norm applied to every token before pooling (timm ``norm``), or None.
        pool: ``"cls"`` (token 0), ``"avg"`` (mean of tokens ``pool_start:``),
            ``"tokens"`` (mean of ``pool_tokens``, e.g. DeiT's CLS + distillation token) or
            ``"attention"`` (``attn_pool`` over tokens ``pool_start:``; SigLIP MAP head).
        pool_start: first pooled token for ``"avg"`` (timm skips prefix tokens).
        pool_tokens: the pooled tokens for ``"tokens"``.
        pooled_norm: norm applied after pooling (``fc_norm``, CLIP ``post_layernorm``) or None.
        proj: ``[d, d_z]`` matrix with ``z = pooled @ proj``, or None.
        proj_bias: ``[d_z]`` or None.
        attn_pool: the attention pool for ``pool == "attention"``.
    """

    token_norm: FrozenNorm | None
    pool: Literal["cls", "avg", "tokens", "attention"]
    pooled_norm: FrozenNorm | None
    proj: torch.Tensor | None = None
    proj_bias: torch.Tensor | None = None
    pool_start: int = 0
    pool_tokens: tuple[int, ...] = ()
    attn_pool: AttentionPool | None = None

    def weights(self, n_tokens: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Pooling weights ``w [n_tokens]`` (sum to 1)."""
        import torch

        w = torch.zeros(n_tokens, dtype=dtype, device=device)
        if self.pool == "cls":
            w[0] = 1.0
        elif self.pool in ("avg", "attention"):
            if n_tokens <= self.pool_start:
                raise UnsupportedModelError("average pooling over an empty token set")
            w[self.pool_start :] = 1.0 / (n_tokens - self.pool_start)
        else:
            w[list(self.pool_tokens)] = 1.0 / len(self.pool_tokens)
        return w

    @property
    def out_dim_changes(self) -> bool:
        return self.proj is not None

    def separable(self, n_support: int) -> bool:
        """True when ``omega_p = w_p * tau_image`` (no per-position statistics to wait for)."""
        if self.attn_pool is not None:
            return False  # the pooling pattern is only known at the end of the pass
        return self.token_norm is None or n_support == 1

    @property
    def n_routes(self) -> int:
        """Parallel linear paths from the tokens to the output: pool heads, else 1."""
        return self.attn_pool.n_routes if self.attn_pool is not None else 1

    def channel_map(self, rows: torch.Tensor, centre: bool) -> torch.Tensor:
        """The image-independent linear part ``rows @ A`` (``[..., d] -> [..., d_z]``) of a
        single-route readout (no attention pool; see :meth:`route_map` otherwise)."""
        if self.token_norm is not None:
            rows = self.token_norm.linear(rows, centre)
        return self.after_pool(rows, centre)

    def route_map(self, rows: torch.Tensor, centre: bool, route_dim: int = 1) -> torch.Tensor:
        """Token-side rows ``[.., R, .., d]`` -> output rows ``[.., .., d_z]`` (routes summed)."""
        if self.token_norm is not None:
            rows = self.token_norm.linear(rows, centre)
        if self.attn_pool is not None:
            rows = rows.movedim(route_dim, -2)  # [..., R, d]
            w_vo = self.attn_pool.w_vo.to(rows.dtype)
            rows = torch_einsum("...rd,rde->...e", rows, w_vo)
        else:
            rows = rows.squeeze(route_dim)
        return self.after_pool(rows, centre)

    def route_map_each(self, rows: torch.Tensor, centre: bool) -> torch.Tensor:
        """Weights ``[..., d]`` -> ``[R, ..., d_z]``: each route's map, not summed."""
        if self.token_norm is not None:
            rows = self.token_norm.linear(rows, centre)
        if self.attn_pool is not None:
            rows = torch_einsum("...d,rde->r...e", rows, self.attn_pool.w_vo.to(rows.dtype))
        else:
            rows = rows[None]
        return self.after_pool(rows, centre)

    def after_pool(self, rows: torch.Tensor, centre: bool) -> torch.Tensor:
        """Pooled-side linear part: pooled norm (frozen, without 1/sigma) and projection."""
        if self.pooled_norm is not None:
            rows = self.pooled_norm.linear(rows, centre)
        if self.proj is not None:
            rows = rows @ self.proj.to(rows.dtype)
        return rows


def torch_einsum(eq: str, *ops: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.einsum(eq, *ops)


@dataclass(frozen=True)
class AttentionPool:
    """Attention pooling with a single learned query (SigLIP's MAP head), pattern frozen.

    With ``y_p`` the (token-normed) tokens and ``beta^r_p = softmax_p(q^r . k^r_p)`` frozen
    per pool head ``r``,

        a = sum_r sum_p beta^r_p (y_p W_V^r + b_V^r) W_O^r + b_O,      z = a + MLP(LN(a)),

    so a component's write ``c_p`` contributes ``sum_r (sum_p beta^r_p c_p) W_V^r W_O^r``
    (each pool head is one *route*), and ``MLP(LN(a))`` is one non-linear leaf, ``pool_mlp``.

    Attributes:
        w_vo: ``[R, d, d_out]`` = ``W_V^r W_O^r`` per pool head.
        b_vo: ``[d_out]`` = ``sum_r b_V^r W_O^r + b_O`` (rows of beta sum to 1), or None.
        pattern: maps the pooled tokens ``y [B, N_pool, d]`` to ``beta [B, R, N_pool]``,
            recomputed from the pool's own weights (query, key projection, qk-norm, scale).
        mlp_write: capture point whose output is ``MLP(LN(a))`` ``[B, 1, d_out]`` (or None).
        pooled: capture point whose output is the pooled vector ``z`` (for later norms).
    """

    w_vo: torch.Tensor
    b_vo: torch.Tensor | None
    pattern: Callable[[torch.Tensor], torch.Tensor]
    mlp_write: Any
    pooled: Any

    @property
    def n_routes(self) -> int:
        return int(self.w_vo.shape[0])
