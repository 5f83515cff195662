"""open_clip ``VisionTransformer`` towers (CLIP ViT-B/L/H, with their projection).

Module paths read: ``conv1``, ``class_embedding``, ``transformer.resblocks[i].{ln_1, attn,
ls_1, ln_2, mlp.c_proj, ls_2}``, ``ln_post``, ``pool_type``, ``final_ln_after_pool``,
``attn_pool``, ``proj``. Attention is keyed on parameter names, not classes:
``attn.in_proj_weight [3d, d]``, ``attn.in_proj_bias``, ``attn.out_proj.{weight, bias}``, which
both ``nn.MultiheadAttention`` (open_clip 2.x/3.x) and open_clip 4's own attention module
expose. ``nn.MultiheadAttention`` runs through ``F.multi_head_attention_forward``, so neither
its pattern nor ``out_proj``'s input is visible to hooks: the queries, keys and values are
recomputed from the captured attention input (the ``ln_1`` output) and ``in_proj_weight``.

The representation is the tower's own output, the (unnormalised) image embedding
``pooled @ proj``; ``vd.wrap`` also accepts a whole ``CLIP`` model and reads its ``.visual``.
open_clip's ``LayerNorm`` casts to the input dtype; its ``LayerNormFp32`` variant computes in
float32, so a float64 run of such a model is only as exact as float32 in those norms.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError, UnsupportedModelError
from ..readout import FrozenNorm, ViTReadout
from .base import AttentionMap, BlockMap, CapturePoint, Preprocessing, ViTMap, register_adapter

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["OpenClipViTAdapter", "load_open_clip"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _tower(module: Any) -> Any:
    """The ``VisionTransformer`` of a tower or of a whole CLIP model, else None."""
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:
        return None
    if isinstance(module, VisionTransformer):
        return module
    visual = getattr(module, "visual", None)
    if isinstance(visual, VisionTransformer) and hasattr(module, "encode_image"):
        return visual
    return None


def _ls_gamma(module: Any, name: str) -> torch.Tensor | None:
    from torch import nn

    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        raise UnsupportedModelError(f"{name}: layer scale {type(module).__name__} has no `gamma`")
    return gamma


class OpenClipViTAdapter:
    family = "open_clip-vit"
    description = "open_clip VisionTransformer towers and CLIP models (token/avg pooling, ln_post, proj)"

    def matches(self, module: nn.Module) -> bool:
        return _tower(module) is not None

    def _block(self, i: int, blk: Any, batch_first: bool) -> BlockMap:
        import torch
        from torch import nn

        name = f"transformer.resblocks.{i}"
        attn = getattr(blk, "attn", None)
        for needed in ("ln_1", "ln_2", "mlp"):
            if not hasattr(blk, needed):
                raise UnsupportedModelError(f"{name}: block {type(blk).__name__} has no `{needed}`")
        if hasattr(blk, "ln_attn") and not isinstance(blk.ln_attn, nn.Identity):
            raise UnsupportedModelError(f"{name}.ln_attn: a norm inside attention (scale_attn) mixes heads")
        w_in = getattr(attn, "in_proj_weight", None)
        out_proj = getattr(attn, "out_proj", None)
        if w_in is None or not isinstance(out_proj, nn.Linear):
            raise UnsupportedModelError(
                f"{name}.attn: {type(attn).__name__} without in_proj_weight/out_proj "
                "(scaled-cosine or head-scaled custom attention is not supported)"
            )
        for flag in ("scaled_cosine", "scale_heads"):
            if getattr(attn, flag, False):
                raise UnsupportedModelError(f"{name}.attn: `{flag}` attention is not supported")
        if not isinstance(getattr(attn, "ln_inner", nn.Identity()), nn.Identity):
            raise UnsupportedModelError(f"{name}.attn.ln_inner: an inner norm mixes heads before out_proj")
        n_heads = int(getattr(attn, "num_heads", 0))
        d = int(w_in.shape[1])
        d_head = d // n_heads
        b_in = getattr(attn, "in_proj_bias", None)
        w_out = out_proj.weight.T.reshape(n_heads, d_head, d)
        v_bias = b_in[2 * d :].reshape(n_heads, d_head) if b_in is not None else None
        attn_batch_first = bool(getattr(attn, "batch_first", batch_first))

        def qkv(caps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            u = caps["attn_in"]
            if not attn_batch_first:
                u = u.transpose(0, 1)
            b, n, _ = u.shape
            x = torch.nn.functional.linear(u, w_in.to(u.dtype), b_in.to(u.dtype) if b_in is not None else None)
            q, k, v = x.reshape(b, n, 3, n_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v

        ls2 = _ls_gamma(blk.ls_2, f"{name}.ls_2")
        c_proj = getattr(blk.mlp, "c_proj", None)
        hidden = w_mlp = b_mlp = None
        if isinstance(c_proj, nn.Linear):
            hidden = CapturePoint(c_proj, "input", "mlp_hidden")
            w_mlp = c_proj.weight.T if ls2 is None else c_proj.weight.T * ls2
            if c_proj.bias is not None:
                b_mlp = c_proj.bias if ls2 is None else c_proj.bias * ls2
        return BlockMap(
            module=blk,
            attn=AttentionMap(
                n_heads=n_heads,
                d_head=d_head,
                scale=d_head**-0.5,
                w_out=w_out,
                b_out=out_proj.bias,
                v_bias=v_bias,
                captures=[CapturePoint(attn, "input", "attn_in")],
                qkv=qkv,
            ),
            ls1=_ls_gamma(blk.ls_1, f"{name}.ls_1"),
            mlp_write=CapturePoint(blk.ls_2, "output", "mlp_write"),
            mlp_hidden=hidden,
            w_mlp_out=w_mlp,
            b_mlp_out=b_mlp,
        )

    def vit_map(self, module: nn.Module) -> ViTMap:
        tower = _tower(module)
        if tower is None:
            raise UnsupportedModelError(f"{type(module).__name__} is not an open_clip VisionTransformer")
        if getattr(tower, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                "attn_pool: open_clip's AttentionalPooler (CoCa, many queries) is not supported"
            )
        pool = getattr(tower, "pool_type", "tok")
        if pool not in ("tok", "avg"):
            raise UnsupportedModelError(f"pool_type={pool!r}: only 'tok' and 'avg' pooling are linear")
        ln_post = FrozenNorm.from_module(tower.ln_post, "ln_post")
        after = bool(getattr(tower, "final_ln_after_pool", False))
        readout = ViTReadout(
            token_norm=None if after else ln_post,
            pool="cls" if pool == "tok" else "avg",
            pooled_norm=ln_post if after else None,
            proj=tower.proj,
            pool_start=1,
        )
        transformer = tower.transformer
        batch_first = bool(getattr(transformer, "batch_first", True))
        blocks = [self._block(i, blk, batch_first) for i, blk in enumerate(transformer.resblocks)]
        patch = tower.conv1.kernel_size
        output_tokens = bool(getattr(tower, "output_tokens", False))

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = tower(x)
            return out[0] if output_tokens else out

        return ViTMap(
            blocks=blocks,
            readout=readout,
            n_prefix=1,
            prefix_types=("cls",),
            patch_size=(int(patch[0]), int(patch[1])),
            forward=forward,
        )

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        tower = _tower(module)
        size = getattr(tower, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        cfg = getattr(tower, "preprocess_cfg", None) or {}
        mean = tuple(getattr(tower, "image_mean", None) or cfg.get("mean") or OPENAI_MEAN)
        std = tuple(getattr(tower, "image_std", None) or cfg.get("std") or OPENAI_STD)
        return Preprocessing(
            input_size=(int(size[0]), int(size[1])),
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=1.0,
            source="open_clip",
        )

    def classifier(self, module: nn.Module) -> None:
        return None


register_adapter(OpenClipViTAdapter())


def load_open_clip(rest: str, *, pretrained: bool, checkpoint: Path | None = None) -> Any:
    """``open_clip.create_model_and_transforms(ARCH, pretrained=TAG)``; ``rest`` is ``ARCH[:TAG]``."""
    import open_clip

    from ..model import Model, load_checkpoint, weights_unavailable

    arch, _, tag = rest.partition(":")
    if arch not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if arch.lower()[:5] in m.lower()][:8]
        raise InputError(f"open_clip has no architecture {arch!r}; similar: {close}")
    use_hub = pretrained and checkpoint is None
    if use_hub and not tag:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if not tags:
            raise InputError(f"open_clip has no pretrained weights for {arch!r}; use pretrained=False")
        tag = tags[0]
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag if use_hub else None)
    except Exception as exc:
        if use_hub:
            raise weights_unavailable(f"open_clip:{arch}:{tag}", exc) from exc
        raise
    weights = f"pretrained:open_clip/{arch}/{tag}" if use_hub else "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(model, checkpoint)
    model.eval()
    extras = {"clip": model, "tokenizer": open_clip.get_tokenizer(arch)}
    return Model(model.visual, name=f"open_clip:{rest}", weights=weights, transform=preprocess, extras=extras)
