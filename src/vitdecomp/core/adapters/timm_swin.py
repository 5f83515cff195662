"""timm ``SwinTransformer`` (Swin V1 tiny/small/base/large, S3/AutoFormerV2), read for the ``"swin"`` engine.

Module paths read (timm 1.0): ``patch_embed``, ``layers[k].downsample.{norm, reduction}``
(``PatchMerging`` at the *start* of stages 1.., timm >= 0.9), ``layers[k].blocks[i].{norm1,
attn.{qkv, proj, relative_position_bias_table, relative_position_index}, window_size,
shift_size, attn_mask, dynamic_mask, get_attn_mask, mlp.fc2}``, ``norm``, ``head``.

The representation is timm's pre-logits feature,
``forward_head(forward_features(x), pre_logits=True)`` = the mean over positions of
``norm(x)`` (``head.global_pool`` must average); logits are that times ``head.fc.weight^T``
plus ``head.fc.bias``. Fused (SDPA) and eager attention are both fine: patterns are
recomputed from the captured ``qkv`` output with the module's own bias table and mask.
Grids that are not a multiple of the window (timm pads them) and odd grids before a merge
(timm pads them too) are supported; so is ``dynamic_img_size=True``.

Not supported (``UnsupportedModelError`` with the reason): SwinV2 / SwinV2-CR (res-post-norm
blocks, cosine attention with a continuous position bias: not implemented yet), pooling
other than the average, modified block, attention or merge classes. Drop-path and dropout
are identities in ``eval()``, which :func:`vitdecomp.decompose` switches to for the pass.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedModelError
from .base import CapturePoint, Preprocessing, register_adapter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..engines.swin import MergeMap, SwinBlockMap, SwinMap

__all__ = ["TimmSwinAdapter"]

_UNSUPPORTED_FAMILIES = {
    "SwinTransformerV2": (
        "timm SwinTransformerV2 is not supported yet: its blocks normalise the attention branch "
        "after the heads are summed (res-post-norm, x + norm1(attn(x))) and use cosine attention "
        "with a continuous position bias MLP; only Swin V1 (SwinTransformer) is decomposed"
    ),
    "SwinTransformerV2Cr": (
        "timm SwinTransformerV2Cr is not supported yet: res-post-norm blocks and cosine attention "
        "with a continuous position bias; only Swin V1 (SwinTransformer) is decomposed"
    ),
}


def _merge_slot_offsets(merge: Any, dim: int) -> tuple[tuple[int, int], ...]:
    """Which 2x2 offset feeds each ``C``-slice of the merge's ``4C`` concat, read by probing.

    A ``[1, 2, 2, C]`` input whose position ``(i, j)`` holds the code ``1 + i + 2 j`` goes through
    the merge module itself; the concat its norm receives says where every offset went.
    """
    import torch

    from ..capture import hooks

    seen: dict[str, torch.Tensor] = {}
    ref = merge.reduction.weight
    probe = torch.zeros(1, 2, 2, dim, dtype=ref.dtype, device=ref.device)
    for i in range(2):
        for j in range(2):
            probe[0, i, j] = 1 + i + 2 * j
    try:
        with torch.no_grad(), hooks([(merge.norm, "input", lambda x: seen.__setitem__("x", x.detach().clone()))]):
            merge(probe)
    except Exception as exc:  # pragma: no cover - a merge that cannot take a 2x2 grid
        raise UnsupportedModelError(f"patch merge {type(merge).__name__} rejected a 2x2 probe: {exc}") from exc
    concat = seen.get("x")
    if concat is None or concat.shape[-1] != 4 * dim:
        raise UnsupportedModelError(f"patch merge {type(merge).__name__} does not normalise a 4C concat")
    codes = concat.reshape(4, dim)
    offsets = []
    for t in range(4):
        if not bool((codes[t] == codes[t, 0]).all()):
            raise UnsupportedModelError("patch merge: a concat slice mixes positions")
        code = round(float(codes[t, 0])) - 1
        offsets.append((code % 2, code // 2))
    if sorted(offsets) != [(0, 0), (0, 1), (1, 0), (1, 1)]:
        raise UnsupportedModelError(f"patch merge: unexpected concat layout {offsets}")
    return tuple(offsets)


class TimmSwinAdapter:
    """Reads timm ``SwinTransformer`` into a :class:`~vitdecomp.core.engines.swin.SwinMap`."""

    family = "timm-swin"
    description = (
        "timm SwinTransformer (Swin V1, S3): W-MSA / SW-MSA heads with relative position bias "
        "and shift masks, patch merging as frozen linear maps, average pooling"
    )

    def matches(self, module: nn.Module) -> bool:
        try:
            from timm.models.swin_transformer import SwinTransformer
        except ImportError:
            return False
        if isinstance(module, SwinTransformer):
            return True
        # claim the V2 families too, so they fail with the reason instead of "no adapter"
        return type(module).__module__.startswith("timm.") and type(module).__name__ in _UNSUPPORTED_FAMILIES

    # ------------------------------------------------------------------ reading
    def _block(self, stage: int, index: int, layer: int, blk: Any) -> SwinBlockMap:
        import torch
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
        from torch import nn

        from ..engines.swin import SwinBlockMap

        name = f"layers.{stage}.blocks.{index}"
        if type(blk) is not SwinTransformerBlock:
            raise UnsupportedModelError(f"{name}: block type {type(blk).__name__} is not timm's SwinTransformerBlock")
        attn = blk.attn
        if type(attn) is not WindowAttention:
            raise UnsupportedModelError(f"{name}.attn: attention type {type(attn).__name__} is not supported")
        fc2 = getattr(blk.mlp, "fc2", None)
        n_heads = int(attn.num_heads)
        w_proj = attn.proj.weight  # [C, H*dh]
        d_head = w_proj.shape[1] // n_heads
        window = (int(blk.window_size[0]), int(blk.window_size[1]))
        shift = (int(blk.shift_size[0]), int(blk.shift_size[1]))
        if tuple(attn.window_size) != window:
            raise UnsupportedModelError(
                f"{name}: attention window {attn.window_size} differs from the block's {window}"
            )
        table_owner: Any = attn  # buffers/parameters read lazily (they follow dtype casts)
        block: Any = blk
        qkv_bias = attn.qkv.bias
        v_bias = qkv_bias[2 * n_heads * d_head :].reshape(n_heads, d_head) if qkv_bias is not None else None
        area = window[0] * window[1]

        def rel_bias() -> torch.Tensor:
            table = table_owner.relative_position_bias_table
            bias = table[table_owner.relative_position_index.view(-1)].view(area, area, n_heads)
            return bias.permute(2, 0, 1)

        def attn_mask(hp: int, wp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
            if not any(shift):
                return None
            if getattr(block, "dynamic_mask", False):
                return block.get_attn_mask(torch.zeros(1, hp, wp, 1, dtype=dtype, device=device))
            return block.attn_mask

        w_mlp_out = b_mlp_out = None
        hidden = None
        if isinstance(fc2, nn.Linear):
            w_mlp_out, b_mlp_out = fc2.weight.T, fc2.bias
            hidden = CapturePoint(fc2, "input", "mlp_hidden")
        return SwinBlockMap(
            module=blk,
            stage=stage,
            index=index,
            layer=layer,
            n_heads=n_heads,
            d_head=d_head,
            scale=float(attn.scale),
            w_out=w_proj.T.reshape(n_heads, d_head, -1),
            b_out=attn.proj.bias,
            v_bias=v_bias,
            qkv=CapturePoint(attn.qkv, "output", "qkv"),
            rel_bias=rel_bias,
            attn_mask=attn_mask,
            window_size=window,
            shift_size=shift,
            mlp_write=CapturePoint(blk.mlp, "output", "mlp_write"),
            mlp_hidden=hidden,
            w_mlp_out=w_mlp_out,
            b_mlp_out=b_mlp_out,
        )

    def _merge(self, stage: int, merge: Any) -> MergeMap:
        from timm.models.swin_transformer import PatchMerging

        from ..engines.swin import MergeMap
        from ..readout import FrozenNorm

        name = f"layers.{stage}.downsample"
        if type(merge) is not PatchMerging:
            raise UnsupportedModelError(f"{name}: downsample {type(merge).__name__} is not timm's PatchMerging")
        dim = int(merge.dim)
        return MergeMap(
            module=merge,
            norm=FrozenNorm.from_module(merge.norm, f"{name}.norm"),
            norm_input=CapturePoint(merge.norm, "input", "merge_concat"),
            reduction=merge.reduction.weight,
            reduction_bias=merge.reduction.bias,
            slot_offsets=_merge_slot_offsets(merge, dim),
        )

    def structure(self, module: nn.Module) -> SwinMap:
        """Read the module; raises :class:`UnsupportedModelError` for anything not exact."""
        from timm.layers import ClassifierHead
        from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
        from torch import nn

        from ..engines.swin import SwinMap, SwinStageMap
        from ..readout import FrozenNorm

        reason = _UNSUPPORTED_FAMILIES.get(type(module).__name__)
        if reason is not None:
            raise UnsupportedModelError(reason)
        m: Any = module
        head = m.head
        if type(head) is not ClassifierHead:
            raise UnsupportedModelError(f"head: {type(head).__name__} is not timm's ClassifierHead (avg pool)")
        pool = head.global_pool
        if not isinstance(getattr(pool, "pool", None), (FastAdaptiveAvgPool, nn.AdaptiveAvgPool2d)):
            raise UnsupportedModelError(
                f"global_pool={getattr(pool, 'pool_type', '?')!r}: only average pooling is linear "
                "('max'/'avgmax' are not; '' returns every position, not one representation)"
            )
        if not isinstance(head.flatten, nn.Identity) or getattr(head, "use_conv", False):
            raise UnsupportedModelError("head: a convolutional classifier head is not supported")
        if getattr(m, "output_fmt", "NHWC") != "NHWC":
            raise UnsupportedModelError(f"output_fmt={m.output_fmt!r}: only NHWC Swin features are supported")

        stages: list[SwinStageMap] = []
        layer = 0
        for k, stage in enumerate(m.layers):
            down = None if isinstance(stage.downsample, nn.Identity) else self._merge(k, stage.downsample)
            if k > 0 and down is None:
                raise UnsupportedModelError(
                    f"layers.{k}: a stage without a patch merge after the first is not supported"
                )
            blocks = []
            for i, blk in enumerate(stage.blocks):
                blocks.append(self._block(k, i, layer, blk))
                layer += 1
            stages.append(SwinStageMap(downsample=down, blocks=blocks))
        if not layer:
            raise UnsupportedModelError("the model has no blocks")
        patch = m.patch_embed.patch_size
        patch_size = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch),) * 2

        def forward(x: torch.Tensor) -> torch.Tensor:
            return m.forward_head(m.forward_features(x), pre_logits=True)

        return SwinMap(
            stages=stages,
            final_norm=FrozenNorm.from_module(m.norm, "norm"),
            final_input=CapturePoint(m.norm, "input", "final"),
            forward=forward,
            patch_size=patch_size,  # type: ignore[arg-type]
        )

    def vit_map(self, module: nn.Module) -> Any:
        """Swin is not an isotropic ViT; its structure is :meth:`structure`."""
        raise UnsupportedModelError("a Swin model has no ViTMap; vitdecomp reads it with TimmSwinAdapter.structure()")

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        from .timm_vit import TimmViTAdapter

        return TimmViTAdapter().preprocessing(module)

    def classifier(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        from torch import nn

        fc = getattr(getattr(module, "head", None), "fc", None)
        if isinstance(fc, nn.Linear):
            return fc.weight, fc.bias
        return None


register_adapter(TimmSwinAdapter())


def _register_engine() -> None:
    from ..engines import register_engine

    register_engine("swin", "vitdecomp.core.engines.swin:decompose_swin")


_register_engine()
