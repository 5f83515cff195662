"""timm ``MaxxVit`` with ``MaxxVitBlock`` stages: MaxViT (``maxvit_*_rw``, ``maxvit_rmlp_*``,
``test_maxvit``) and MaxxViT (ConvNeXt conv blocks, ``maxxvit*``, ``maxxvitv2*`` grid-only).

Module paths read (timm 1.0): ``stages[i].blocks[j].{conv.{shortcut.{pool, expand}, drop_path},
attn_block, attn_grid}``, each partition unit's ``{attn.{qkv, rel_pos, proj}, ls1, mlp.fc2, ls2,
partition_block, partition_size}``, ``norm``, ``head.{global_pool, norm, pre_logits, fc}``.

The representation is timm's pre-logits feature, ``forward_head(forward_features(x),
pre_logits=True)``: with a ``ClassifierHead`` the average over positions of the final
per-position LayerNorm (norm-then-pool); with a ``NormMlpClassifierHead`` whose ``pre_logits``
is the identity, the head's LayerNorm of the average (pool-then-norm, one set of statistics).
Logits are that times ``head.fc.weight^T`` plus ``head.fc.bias``.

A ``NormMlpClassifierHead`` with a hidden ``Linear + tanh`` pre-logits MLP (every
``maxvit_*_tf`` model, the paper's checkpoints) is not linear, so for those models the
representation is the input of that MLP: ``head.norm(head.global_pool(features))``, the
pool-then-norm readout docs/method.md §2.6 names (the published decomposer uses the pre-head mean).
Such models have no linear classifier (``classifier()`` is None).

Not supported (``UnsupportedModelError`` naming the reason): CoAtNet-style stages (conv or
transformer blocks outside ``MaxxVitBlock``), parallel partition attention, NCHW partition
attention, max-pool shortcuts, non-average global pooling.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engines.maxvit import ConvUnitMap, MaxViTMap, PartitionUnitMap, ShortcutMap
from ...errors import UnsupportedModelError
from ..readout import FrozenNorm
from .base import CapturePoint, Preprocessing, layer_scale_gamma, register_adapter

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TimmMaxViTAdapter"]


def _conv1x1(conv: Any, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W [C_out, C_in]`` and bias of a pointwise, unstrided, ungrouped ``nn.Conv2d``."""
    from torch import nn

    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedModelError(f"{name}: {type(conv).__name__} is not a 1x1 convolution")
    padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0) if conv.padding == "valid" else None
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.stride) != (1, 1) or conv.groups != 1 or padding != (0, 0):
        raise UnsupportedModelError(
            f"{name}: only a 1x1, stride-1, ungrouped, unpadded shortcut convolution is read as a channel map"
        )
    return conv.weight[:, :, 0, 0], conv.bias


def _shortcut(sc: Any, name: str) -> ShortcutMap | None:
    """The linear shortcut of a conv block: identity, ``Downsample2d`` (avg pool + 1x1) or a 1x1 conv."""
    from timm.models.maxxvit import Downsample2d
    from torch import nn

    if isinstance(sc, nn.Identity):
        return None
    if isinstance(sc, Downsample2d):
        pool = sc.pool
        if not isinstance(pool, nn.AvgPool2d):
            raise UnsupportedModelError(
                f"{name}.pool: {type(pool).__name__} is not linear (max pooling picks one component's "
                "value per window, so upstream terms do not pass through it additively)"
            )
        if isinstance(sc.expand, nn.Identity):
            return ShortcutMap(pool=pool, weight=None, bias=None)
        weight, bias = _conv1x1(sc.expand, f"{name}.expand")
        return ShortcutMap(pool=pool, weight=weight, bias=bias)
    if isinstance(sc, nn.Conv2d):
        weight, bias = _conv1x1(sc, name)
        return ShortcutMap(pool=None, weight=weight, bias=bias)
    raise UnsupportedModelError(f"{name}: shortcut {type(sc).__name__} is not supported")


class TimmMaxViTAdapter:
    family = "timm-maxvit"
    description = (
        "timm MaxxVit with MaxxVitBlock stages: MaxViT (MBConv + window + grid attention) and "
        "MaxxViT (ConvNeXt conv blocks); avg pooling, norm-then-pool or pool-then-norm head"
    )

    def matches(self, module: nn.Module) -> bool:
        try:
            from timm.models.maxxvit import MaxxVit
        except ImportError:
            return False
        return isinstance(module, MaxxVit)

    def _conv_unit(self, conv: nn.Module, stage: int, index: int, layer: int, path: str) -> ConvUnitMap:
        from timm.models.maxxvit import ConvNeXtBlock, MbConvBlock

        if type(conv) is MbConvBlock:
            kind = "mbconv"
        elif type(conv) is ConvNeXtBlock:
            kind = "convnext"
        else:
            raise UnsupportedModelError(f"{path}: conv block {type(conv).__name__} is not MbConvBlock/ConvNeXtBlock")
        drop_path = getattr(conv, "drop_path", None)
        if drop_path is None:
            raise UnsupportedModelError(f"{path}: no `drop_path` module to read the residual branch from")
        return ConvUnitMap(
            module=conv,
            stage=stage,
            index=index,
            layer=layer,
            path=path,
            branch=CapturePoint(drop_path, "output", "conv_branch"),
            shortcut=_shortcut(conv.shortcut, f"{path}.shortcut"),
            kind=kind,
        )

    def _partition_unit(self, unit: nn.Module, stage: int, index: int, layer: int, path: str) -> PartitionUnitMap:
        from timm.layers import Mlp, RelPosBias, RelPosBiasTf, RelPosMlp
        from timm.models.maxxvit import AttentionCl, PartitionAttentionCl, grid_partition, window_partition
        from torch import nn

        if type(unit) is not PartitionAttentionCl:
            raise UnsupportedModelError(f"{path}: {type(unit).__name__} is not the channels-last PartitionAttentionCl")
        m: Any = unit
        attn = m.attn
        if type(attn) is not AttentionCl:
            raise UnsupportedModelError(f"{path}.attn: attention type {type(attn).__name__} is not supported")
        if not isinstance(attn.qkv, nn.Linear) or not isinstance(attn.proj, nn.Linear):
            raise UnsupportedModelError(f"{path}.attn: qkv/proj are not Linear layers")
        n_heads, d_head = int(attn.num_heads), int(attn.dim_head)
        width = n_heads * d_head
        head_first = bool(attn.head_first)
        rel_pos = attn.rel_pos
        size = tuple(int(s) for s in m.partition_size)
        n_slot = size[0] * size[1]
        rel_bias = None
        if rel_pos is not None:
            if not isinstance(rel_pos, (RelPosBias, RelPosMlp, RelPosBiasTf)):
                raise UnsupportedModelError(
                    f"{path}.attn.rel_pos: {type(rel_pos).__name__} is not an additive relative-position bias"
                )
            if getattr(rel_pos, "prefix_tokens", 0):
                raise UnsupportedModelError(f"{path}.attn.rel_pos: prefix tokens are not supported")
            if rel_pos.get_bias().numel() != n_heads * n_slot * n_slot:
                raise UnsupportedModelError(f"{path}.attn.rel_pos: bias does not match {size} partitions")

            def rel_bias() -> torch.Tensor:
                return rel_pos.get_bias().reshape(n_heads, n_slot, n_slot)

        def split_qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            b = x.shape[0]
            x = x.reshape(b, -1, 3 * width)
            if head_first:  # channels (head, [q | k | v], d_h)
                q, k, v = x.reshape(b, -1, n_heads, 3 * d_head).transpose(1, 2).chunk(3, dim=3)
            else:  # channels ([q | k | v], head, d_h)
                q, k, v = x.reshape(b, -1, 3, n_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v

        qkv_b = attn.qkv.bias
        v_bias = None
        if qkv_b is not None:
            if head_first:
                v_bias = qkv_b.reshape(n_heads, 3 * d_head)[:, 2 * d_head :]
            else:
                v_bias = qkv_b.reshape(3, n_heads, d_head)[2]
        mlp = m.mlp
        if type(mlp) is not Mlp or not isinstance(mlp.fc2, nn.Linear):
            raise UnsupportedModelError(f"{path}.mlp: {type(mlp).__name__} is not timm's Mlp")
        ls2 = layer_scale_gamma(m.ls2, f"{path}.ls2")
        fc2 = mlp.fc2
        w_mlp_out = fc2.weight.T if ls2 is None else fc2.weight.T * ls2
        b_mlp_out = None
        if fc2.bias is not None:
            b_mlp_out = fc2.bias if ls2 is None else fc2.bias * ls2
        window = bool(m.partition_block)

        def partition_fn(x: torch.Tensor) -> torch.Tensor:
            return window_partition(x, list(size)) if window else grid_partition(x, list(size))

        return PartitionUnitMap(
            module=unit,
            stage=stage,
            index=index,
            layer=layer,
            path=path,
            partition="window" if window else "grid",
            partition_fn=partition_fn,
            n_heads=n_heads,
            d_head=d_head,
            scale=float(attn.scale),
            w_out=attn.proj.weight.T.reshape(n_heads, d_head, -1),
            b_out=attn.proj.bias,
            v_bias=v_bias,
            qkv=CapturePoint(attn.qkv, "output", "qkv"),
            split_qkv=split_qkv,
            rel_bias=rel_bias,
            ls1=layer_scale_gamma(m.ls1, f"{path}.ls1"),
            mlp_write=CapturePoint(m.ls2, "output", "mlp_write"),
            mlp_hidden=CapturePoint(fc2, "input", "mlp_hidden"),
            w_mlp_out=w_mlp_out,
            b_mlp_out=b_mlp_out,
        )

    def _readout(self, m: Any) -> tuple[FrozenNorm | None, FrozenNorm | None, str]:
        from timm.layers import ClassifierHead, NormMlpClassifierHead
        from torch import nn

        head = m.head
        pool = getattr(head, "global_pool", None)
        pool_type = str(getattr(pool, "pool_type", "")).lower()
        if pool_type not in ("avg", "fast", "fastavg"):
            raise UnsupportedModelError(
                f"head.global_pool: pool_type={pool_type!r}: only average pooling is linear "
                "('max'/'avgmax'/'catavgmax' are not; '' returns every position)"
            )
        if type(head) is NormMlpClassifierHead:
            pooled_norm = FrozenNorm.from_module(head.norm, "head.norm")
        elif type(head) is ClassifierHead:
            pooled_norm = None
        else:
            raise UnsupportedModelError(f"head: {type(head).__name__} is not ClassifierHead/NormMlpClassifierHead")
        return FrozenNorm.from_module(m.norm, "norm"), pooled_norm, type(head).__name__

    def structure(self, module: nn.Module) -> MaxViTMap:
        """Read the model into a :class:`~vitdecomp.core.engines.maxvit.MaxViTMap` (raises if not exact)."""
        from timm.models.maxxvit import MaxxVitBlock, ParallelMaxxVitBlock

        m: Any = module
        units: list[ConvUnitMap | PartitionUnitMap] = []
        for si, stage in enumerate(m.stages):
            index = 0
            for bi, blk in enumerate(stage.blocks):
                path = f"stages.{si}.blocks.{bi}"
                if type(blk) is ParallelMaxxVitBlock:
                    raise UnsupportedModelError(
                        f"{path}: ParallelMaxxVitBlock (window and grid attention concatenated into one MLP) "
                        "is not supported"
                    )
                if type(blk) is not MaxxVitBlock:
                    raise UnsupportedModelError(
                        f"{path}: {type(blk).__name__} outside a MaxxVitBlock (a CoAtNet-style stage) is not "
                        "supported; vitdecomp reads MaxViT/MaxxViT stages of MaxxVitBlock only"
                    )
                if blk.nchw_attn:
                    raise UnsupportedModelError(
                        f"{path}: NCHW partition attention (use_nchw_attn=True) is not supported; "
                        "build the model with the default channels-last attention"
                    )
                units.append(self._conv_unit(blk.conv, si, index, len(units), f"{path}.conv"))
                index += 1
                for name in ("attn_block", "attn_grid"):
                    part = getattr(blk, name)
                    if part is None:
                        continue
                    units.append(self._partition_unit(part, si, index, len(units), f"{path}.{name}"))
                    index += 1
        if not units:
            raise UnsupportedModelError("the model has no MaxxVitBlock")
        token_norm, pooled_norm, head = self._readout(m)

        if _has_tanh_head(m):
            head_mod = m.head

            def forward(x: torch.Tensor) -> torch.Tensor:
                # the input of the head's Linear + tanh pre-logits MLP (see the module docstring)
                return head_mod.flatten(head_mod.norm(head_mod.global_pool(m.forward_features(x))))

        else:

            def forward(x: torch.Tensor) -> torch.Tensor:
                return m.forward_head(m.forward_features(x), pre_logits=True)

        return MaxViTMap(
            units=units,
            token_norm=token_norm,
            pooled_norm=pooled_norm,
            final=CapturePoint(m.stages[-1], "output", "final"),
            forward=forward,
            head=head,
        )

    def vit_map(self, module: nn.Module) -> Any:
        """MaxViT is not an isotropic ViT; its structure is :meth:`structure`."""
        raise UnsupportedModelError(
            "a MaxViT model has no ViTMap; vitdecomp reads it with TimmMaxViTAdapter.structure()"
        )

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=module)
        size = tuple(getattr(module, "img_size", None) or cfg["input_size"][-2:])  # the built size wins
        return Preprocessing(
            input_size=(int(size[0]), int(size[1])),
            mean=tuple(float(x) for x in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in cfg["std"]),  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=float(cfg.get("crop_pct", 1.0)),
            source="timm.data.resolve_data_config",
        )

    def classifier(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        from torch import nn

        fc = getattr(getattr(module, "head", None), "fc", None)
        if isinstance(fc, nn.Linear) and not _has_tanh_head(module):
            return fc.weight, fc.bias
        return None


def _has_tanh_head(module: Any) -> bool:
    """True for a ``NormMlpClassifierHead`` with a hidden (Linear + tanh) pre-logits MLP."""
    from timm.layers import NormMlpClassifierHead
    from torch import nn

    head = getattr(module, "head", None)
    return type(head) is NormMlpClassifierHead and not isinstance(head.pre_logits, nn.Identity)


register_adapter(TimmMaxViTAdapter())


def _register_engine() -> None:
    from ..engines import register_engine

    register_engine("maxvit", "vitdecomp.core.engines.maxvit:decompose_maxvit")


_register_engine()
