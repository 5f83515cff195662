"""timm ``VisionTransformer`` (DeiT, DeiT3, DINO, DINOv2 +/- registers, AugReg, CLIP towers).

Module paths read (timm 1.0): ``patch_embed``, ``cls_token``, ``reg_token``,
``num_prefix_tokens``, ``blocks[i].{norm1, attn.{qkv, q_norm, k_norm, norm, proj}, ls1,
norm2, mlp.fc2, ls2}``, ``norm``, ``global_pool``, ``fc_norm``, ``attn_pool``, ``head``.

The representation is timm's pre-logits feature,
``forward_head(forward_features(x), pre_logits=True)``; logits are that times
``head.weight^T`` plus ``head.bias``. Fused (SDPA) and eager attention are both fine:
the pattern rows are recomputed from the captured ``qkv`` output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedModelError
from ..readout import AttentionPool, FrozenNorm, ViTReadout
from .base import (
    AttentionMap,
    BlockMap,
    CapturePoint,
    Preprocessing,
    ViTMap,
    layer_scale_gamma,
    register_adapter,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["TimmViTAdapter"]


def _attention_pool(pool: Any) -> AttentionPool:
    """timm ``AttentionPoolLatent`` (MAP head) with one latent query, read as an :class:`AttentionPool`."""
    import torch
    from timm.layers.attention_pool import AttentionPoolLatent

    name = "attn_pool"
    if type(pool) is not AttentionPoolLatent:
        raise UnsupportedModelError(f"{name}: {type(pool).__name__} pooling is not supported (only AttentionPoolLatent)")
    if pool.latent_len != 1:
        raise UnsupportedModelError(f"{name}: {pool.latent_len} latent queries (only 1 is supported)")
    if pool.pos_embed is not None:
        raise UnsupportedModelError(f"{name}: a pooling position embedding is not supported")
    n_heads, d_head = pool.num_heads, pool.head_dim
    width = n_heads * d_head
    kv_w, kv_b = pool.kv.weight, pool.kv.bias
    w_v = kv_w[width:].reshape(n_heads, d_head, -1).transpose(1, 2)  # [R, d, dh]
    w_o = pool.proj.weight.T.reshape(n_heads, d_head, -1)  # [R, dh, d_out]
    w_vo = w_v @ w_o
    b_vo = pool.proj.bias
    if kv_b is not None:
        vb = torch.einsum("rd,rde->e", kv_b[width:].reshape(n_heads, d_head), w_o)
        b_vo = vb if b_vo is None else b_vo + vb

    def pattern(y: torch.Tensor) -> torch.Tensor:
        b, n, _ = y.shape
        q = pool.q(pool.latent).reshape(1, 1, n_heads, d_head).transpose(1, 2)  # [1,R,1,dh]
        k = torch.nn.functional.linear(y, kv_w[:width], kv_b[:width] if kv_b is not None else None)
        k = k.reshape(b, n, n_heads, d_head).transpose(1, 2)  # [B,R,N,dh]
        q, k = pool.q_norm(q).to(y.dtype), pool.k_norm(k)
        return torch.softmax((q @ k.transpose(-1, -2)) * pool.scale, dim=-1)[:, :, 0]  # [B,R,N]

    mlp = CapturePoint(pool.mlp, "output", "pool_mlp") if pool.mlp is not None else None
    return AttentionPool(w_vo=w_vo, b_vo=b_vo, pattern=pattern, mlp_write=mlp, pooled=CapturePoint(pool, "output", "pooled"))


class TimmViTAdapter:
    family = "timm-vit"
    description = (
        "timm VisionTransformer: DeiT, DeiT3, DINO, DINOv2 (+registers), AugReg, CLIP, SigLIP "
        "(cls / avg / MAP attention pooling)"
    )

    def matches(self, module: nn.Module) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(module, VisionTransformer)

    def _block(self, i: int, blk: nn.Module) -> BlockMap:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block
        from torch import nn

        name = f"blocks.{i}"
        if type(blk) is not Block:
            raise UnsupportedModelError(
                f"{name}: block type {type(blk).__name__} is not the pre-norm timm Block "
                "(post-norm, parallel and scaled blocks mix components non-linearly)"
            )
        attn = blk.attn
        if type(attn) is not Attention:
            raise UnsupportedModelError(f"{name}.attn: attention type {type(attn).__name__} is not supported")
        if not isinstance(attn.norm, nn.Identity):
            raise UnsupportedModelError(
                f"{name}.attn.norm: scale_norm normalises across merged heads before `proj`, "
                "so heads are no longer separable"
            )
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{name}.attn.gate: gated attention output is not supported yet")
        if not isinstance(blk.drop_path1, nn.Identity) and blk.training:
            raise UnsupportedModelError(f"{name}: drop_path active in training mode")
        n_heads, d_head = attn.num_heads, attn.head_dim
        w_proj = attn.proj.weight  # [d, H*dh]
        d = w_proj.shape[0]
        w_out = w_proj.T.reshape(n_heads, d_head, d)
        qkv_bias = attn.qkv.bias
        v_bias = qkv_bias[2 * n_heads * d_head :].reshape(n_heads, d_head) if qkv_bias is not None else None
        q_norm, k_norm = attn.q_norm, attn.k_norm

        def qkv(caps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            x = caps["qkv"]
            b, n, _ = x.shape
            q, k, v = x.reshape(b, n, 3, n_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)
            return q_norm(q), k_norm(k), v

        ls2 = layer_scale_gamma(blk.ls2, f"{name}.ls2")
        fc2 = getattr(blk.mlp, "fc2", None)
        w_mlp_out = b_mlp_out = None
        hidden = None
        if isinstance(fc2, nn.Linear):
            w_mlp_out = fc2.weight.T if ls2 is None else fc2.weight.T * ls2
            if fc2.bias is not None:
                b_mlp_out = fc2.bias if ls2 is None else fc2.bias * ls2
            hidden = CapturePoint(fc2, "input", "mlp_hidden")
        return BlockMap(
            module=blk,
            attn=AttentionMap(
                n_heads=n_heads,
                d_head=d_head,
                scale=float(attn.scale),
                w_out=w_out,
                b_out=attn.proj.bias,
                v_bias=v_bias,
                captures=[CapturePoint(attn.qkv, "output", "qkv")],
                qkv=qkv,
            ),
            ls1=layer_scale_gamma(blk.ls1, f"{name}.ls1"),
            mlp_write=CapturePoint(blk.ls2, "output", "mlp_write"),
            mlp_hidden=hidden,
            w_mlp_out=w_mlp_out,
            b_mlp_out=b_mlp_out,
        )

    def vit_map(self, module: nn.Module) -> ViTMap:
        m: Any = module
        attn_pool = _attention_pool(m.attn_pool) if getattr(m, "attn_pool", None) is not None else None
        distilled = type(m).__name__ == "VisionTransformerDistilled"
        pool = m.global_pool
        n_prefix = int(m.num_prefix_tokens)
        has_cls = m.cls_token is not None
        if attn_pool is not None:
            readout_pool, tokens = "attention", ()
        elif distilled:
            readout_pool, tokens = "tokens", (0, 1)
        elif pool == "token":
            if not has_cls:
                raise UnsupportedModelError("global_pool='token' without a class token")
            readout_pool, tokens = "cls", ()
        elif pool == "avg":
            readout_pool, tokens = "avg", ()
        else:
            raise UnsupportedModelError(
                f"global_pool={pool!r}: only 'token' and 'avg' pooling are linear "
                "('max'/'avgmax' are not; '' returns every token)"
            )
        readout = ViTReadout(
            token_norm=FrozenNorm.from_module(m.norm, "norm"),
            pool=readout_pool,  # type: ignore[arg-type]
            pooled_norm=FrozenNorm.from_module(m.fc_norm, "fc_norm"),
            pool_start=0 if getattr(m, "pool_include_prefix", False) else n_prefix,
            pool_tokens=tokens,
            attn_pool=attn_pool,
        )
        blocks = [self._block(i, blk) for i, blk in enumerate(m.blocks)]
        prefix = (["cls"] if has_cls else []) + ["reg"] * (n_prefix - int(has_cls))
        patch = m.patch_embed.patch_size
        patch_size = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch),) * 2

        def forward(x: torch.Tensor) -> torch.Tensor:
            return m.forward_head(m.forward_features(x), pre_logits=True)

        return ViTMap(
            blocks=blocks,
            readout=readout,
            n_prefix=n_prefix,
            prefix_types=tuple(prefix),
            patch_size=patch_size,  # type: ignore[arg-type]
            forward=forward,
        )

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=module)
        size = cfg["input_size"][-2:]
        img_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if img_size is not None:  # the built size wins over the pretrained config's
            size = tuple(img_size)
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

        head = getattr(module, "head", None)
        if isinstance(head, nn.Linear):
            return head.weight, head.bias
        return None


register_adapter(TimmViTAdapter())


def load_timm(name: str, *, pretrained: bool, checkpoint: Any = None) -> Any:
    """``timm.create_model(name)`` with pretrained weights, a local checkpoint, or random init."""
    import timm

    from ...errors import InputError
    from ..model import Model, hub_offline, load_checkpoint, weights_unavailable

    if not timm.is_model(name):
        raise InputError(f"timm has no model named {name!r} (see timm.list_models())")
    use_hub = pretrained and checkpoint is None
    if use_hub and hub_offline() and not _timm_weights_cached(name):
        raise weights_unavailable(f"timm:{name}", FileNotFoundError("not in the local Hugging Face cache"))
    try:
        module = timm.create_model(name, pretrained=use_hub)
    except Exception as exc:
        if use_hub:
            raise weights_unavailable(f"timm:{name}", exc) from exc
        raise
    weights = f"pretrained:{name}" if use_hub else "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(module, checkpoint)
    module.eval()
    transform = None
    try:
        from timm.data import create_transform, resolve_data_config

        transform = create_transform(**resolve_data_config({}, model=module))
    except Exception:  # pragma: no cover - older timm
        transform = None
    return Model(module, name=f"timm:{name}", weights=weights, transform=transform)


def _timm_weights_cached(name: str) -> bool:
    """Whether timm's pretrained weights for ``name`` are in the local Hugging Face cache.

    Only hub-hosted weights can be checked; for URL-hosted ones this answers True and timm's
    own loader decides (it reads its own cache first).
    """
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg
    except ImportError:  # pragma: no cover
        return True
    cfg = get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return True
    repo, _, revision = hub_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin",
                     "open_clip_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
            return True
    return False
