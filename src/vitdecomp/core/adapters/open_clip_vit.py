"""open_clip vision towers (CLIP ViT-B/L/H/g, with their projection) and whole CLIP models.

What is read
------------
``vd.wrap`` accepts an ``open_clip.transformer.VisionTransformer`` tower, or a whole model
(``CLIP``, ``CustomTextCLIP``) whose ``.visual`` is one; the representation is then
``model.encode_image(x)`` *unnormalised*, which is ``visual(x)``, the image embedding
``pooled @ proj`` ``[B, d_z]`` (with ``output_tokens=True`` the pooled part of the output).

Module paths (open_clip 3.x; tested on 3.3). The attention is read through parameter names
so that open_clip 4.x's own batch-first attention module, which keeps them, reads the same
way (not tested here: 4.x is not on PyPI yet):

* embedding: ``conv1`` (patch size), ``class_embedding`` (one CLS token, no registers),
  ``positional_embedding``, ``ln_pre``: all of it is the ``embed`` component;
* blocks ``transformer.resblocks[i]``: ``x + ls_1(attn(ln_1 x))``, then
  ``x + ls_2(mlp(ln_2 x))`` with ``mlp = c_fc -> gelu [-> ln] -> c_proj``;
* attention is keyed on **parameter names**, not classes: ``attn.in_proj_weight [3d, d]``,
  ``attn.in_proj_bias [3d]``, ``attn.out_proj.{weight, bias}``. ``nn.MultiheadAttention``
  (open_clip <= 3.x) runs through ``F.multi_head_attention_forward``, so neither its pattern
  nor ``out_proj``'s input is ever visible to a hook; the adapter captures the attention's
  *input* (the ``ln_1`` output, a forward pre-hook on ``attn``) and recomputes
  ``q, k, v = F.linear(u, in_proj_weight, in_proj_bias)`` split into heads ``[B, H, N, d_h]``;
* layer scale: ``ls_1`` / ``ls_2`` are ``LayerScale`` (``gamma [d]``) or ``Identity``; the MLP
  write is the output of ``ls_2`` (also correct for ``LayerScale(inplace=True)``, whose
  ``mul_`` returns the scaled tensor); neurons are the input of ``mlp.c_proj`` with
  ``W_out = c_proj.weight^T * gamma``;
* readout (``VisionTransformer._pool``): ``ln_post`` per token then ``pool_type`` ``'tok'``
  (CLS) or ``'avg'`` (mean of the patch tokens ``1:``), or with ``final_ln_after_pool`` the
  pool first and ``ln_post`` after it; then ``@ proj`` (``[width, d_z]``, may be None).

open_clip's own ``Attention`` (``CustomResidualAttentionBlock``, chosen by ``qk_norm`` /
``scale_heads`` / ... options) is read when it is exact: ``qk_norm`` (``ln_q``/``ln_k`` are
applied to the recomputed ``q``/``k``) and ``scale_heads`` (the per-head ``head_scale`` is
folded into ``W_O^h``) are supported; scaled-cosine attention (``logit_scale``), an inner
norm (``ln_inner``, ``scale_attn_inner``) or a norm after attention (``ln_attn``,
``scale_attn``) raise :class:`~vitdecomp.errors.UnsupportedModelError`, as do the attentional
pooler (``attn_pool``, CoCa), ``pool_type='none'``, ``add_zero_attn``/``bias_k``, and blocks run
sequence-first (``[N, B, d]``; old open_clip, or ``Transformer(batch_first=False)``).

Towers with a timm trunk (``open_clip.timm_model.TimmModel``: SigLIP, ConvNeXt, ... configs)
are delegated to the timm ViT adapter for the trunk when the trunk is a timm
``VisionTransformer``; the tower's linear ``head.proj`` (and the trunk's own ``head``) are
folded into the readout projection. An MLP head or a custom attention pool raises.

Precision
---------
open_clip's ``LayerNorm`` computes in the input dtype, so ``decompose(..., dtype=torch.float64)``
runs the whole tower in float64 (tolerance 1e-10). ``LayerNormFp32`` (used when a model is
built with ``precision='fp16'``/``'bf16'``) always casts its input to float32; it cannot run
with float64 weights at all (torch refuses float32 input with float64 weights), so
``dtype=torch.float64`` raises :class:`~vitdecomp.errors.UnsupportedModelError` for such a
model: decompose it in float32 (exact to 1e-5) or in its own dtype. Even if it could run,
its float32 ``ln_post`` would cap the readout at float32 accuracy.

Example (runs offline on a tiny random CLIP)::

    import vitdecomp as vd
    from vitdecomp.testing import tiny_open_clip

    model = vd.wrap(tiny_open_clip())           # a whole CLIP, read through its .visual
    x = model.example_input(batch=2)
    stack = vd.decompose(model, x, granularity="head")
    assert stack.error() < 1e-5                  # rows sum to clip.encode_image(x)
    # model = vd.load("open_clip:ViT-B-16:laion2b_s34b_b88k")   # weights from the local cache
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import InputError, UnsupportedModelError
from ..readout import FrozenNorm, ViTReadout
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

    from ..model import Model

__all__ = ["OpenClipViTAdapter", "load_open_clip"]

log = logging.getLogger(__name__)

_SCHEMAS = ("hf-hub:", "local-dir:")
# Attention parameters the adapter knows how to read (anything else in ``attn`` is refused).
_ATTN_PARAMS = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


def _tower_classes() -> tuple[type, ...]:
    """open_clip's vision tower classes that are importable here."""
    classes: list[type] = []
    try:
        from open_clip.transformer import VisionTransformer

        classes.append(VisionTransformer)
    except ImportError:
        return ()
    try:
        from open_clip.timm_model import TimmModel

        classes.append(TimmModel)
    except ImportError:  # pragma: no cover - open_clip without its timm adapter
        pass
    return tuple(classes)


def _vision_tower(module: Any) -> Any:
    """The open_clip vision tower of a tower or of a whole CLIP-like model, else None."""
    classes = _tower_classes()
    if not classes:
        return None
    if isinstance(module, classes):
        return module
    visual = getattr(module, "visual", None)
    if isinstance(visual, classes) and callable(getattr(module, "encode_image", None)):
        return visual
    return None


def _is_timm_tower(tower: Any) -> bool:
    try:
        from open_clip.timm_model import TimmModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tower, TimmModel)


def _is_identity(module: Any) -> bool:
    from torch import nn

    return module is None or isinstance(module, nn.Identity)


class _Layout:
    """Run-time facts the stock forward reveals (the batch size of the current pass)."""

    def __init__(self) -> None:
        self.batch: int | None = None


class OpenClipViTAdapter:
    """Reads open_clip ``VisionTransformer`` towers and whole CLIP models (see the module doc)."""

    family = "open_clip-vit"
    description = (
        "open_clip VisionTransformer towers and CLIP/CustomTextCLIP models (tok/avg pooling, "
        "final_ln_after_pool, LayerScale, qk-norm); timm-trunk towers with a timm ViT trunk"
    )

    def matches(self, module: nn.Module) -> bool:
        return _vision_tower(module) is not None

    # ---------------------------------------------------------------- attention
    def _attention(
        self, name: str, attn: Any, transformer_batch_first: bool | None, layout: _Layout
    ) -> AttentionMap:
        """One attention module, keyed on ``in_proj_weight``/``in_proj_bias``/``out_proj``.

        Args:
            name: the module path, for messages.
            attn: ``nn.MultiheadAttention`` or open_clip's ``Attention`` (any module with those names).
            transformer_batch_first: the enclosing ``Transformer.batch_first`` (None if unknown).
            layout: filled by the map's forward with the batch size, to verify the layout.

        Returns:
            The :class:`AttentionMap`; its ``qkv`` maps the captured ``attn`` input ``[B, N, d]``
            to ``q, k, v`` each ``[B, H, N, d_h]``.
        """
        import torch
        from torch import nn

        w_in = getattr(attn, "in_proj_weight", None)
        out_proj = getattr(attn, "out_proj", None)
        if not isinstance(w_in, torch.Tensor) or not isinstance(out_proj, nn.Linear):
            raise UnsupportedModelError(
                f"{name}: {type(attn).__name__} has no packed `in_proj_weight` and `out_proj` Linear "
                "(separate q/k/v projections, e.g. kdim/vdim != embed_dim, are not supported)"
            )
        if getattr(attn, "scaled_cosine", False) or getattr(attn, "logit_scale", None) is not None:
            raise UnsupportedModelError(
                f"{name}: scaled-cosine attention (`scaled_cosine_attn=True`, `logit_scale`) is not supported"
            )
        if not _is_identity(getattr(attn, "ln_inner", None)):
            raise UnsupportedModelError(
                f"{name}.ln_inner: an inner norm (`scale_attn_inner=True`) normalises across the merged "
                "heads before out_proj, so heads are no longer separable"
            )
        if getattr(attn, "add_zero_attn", False):
            raise UnsupportedModelError(f"{name}: `add_zero_attn=True` adds a key outside the sequence")
        if getattr(attn, "bias_k", None) is not None or getattr(attn, "bias_v", None) is not None:
            raise UnsupportedModelError(f"{name}: `add_bias_kv=True` adds a key/value outside the sequence")
        ln_q, ln_k = getattr(attn, "ln_q", None), getattr(attn, "ln_k", None)
        head_scale = getattr(attn, "head_scale", None)
        known = set(_ATTN_PARAMS)
        if isinstance(head_scale, torch.Tensor):
            known.add("head_scale")
        for pname, _ in attn.named_parameters():
            if pname in known or (pname.split(".")[0] in ("ln_q", "ln_k")):
                continue
            raise UnsupportedModelError(f"{name}.{pname}: a parameter vitdecomp does not know how to read")
        for bname, _ in attn.named_buffers():
            raise UnsupportedModelError(f"{name}.{bname}: a buffer vitdecomp does not know how to read")
        batch_first = getattr(attn, "batch_first", None)
        if batch_first is None:
            batch_first = transformer_batch_first
        if batch_first is False:
            raise UnsupportedModelError(
                f"{name}: runs sequence-first ([N, B, d], batch_first=False); vitdecomp reads the residual "
                "stream batch-first [B, N, d] (recent open_clip builds vision towers batch-first)"
            )

        n_heads = int(getattr(attn, "num_heads", 0) or 0)
        d = int(w_in.shape[1])
        if n_heads <= 0 or d % n_heads or tuple(w_in.shape) != (3 * d, d):
            raise UnsupportedModelError(
                f"{name}: in_proj_weight {tuple(w_in.shape)} with {n_heads} heads is not a packed [3d, d] projection"
            )
        d_head = d // n_heads
        b_in = getattr(attn, "in_proj_bias", None)
        w_out = out_proj.weight.T.reshape(n_heads, d_head, out_proj.weight.shape[0])  # [H, dh, d]
        if isinstance(head_scale, torch.Tensor):  # NormFormer head scaling: a per-head scalar before out_proj
            w_out = w_out * head_scale.reshape(n_heads, 1, 1)
        v_bias = b_in[2 * d :].reshape(n_heads, d_head) if b_in is not None else None
        scale = getattr(attn, "scale", None)
        scale = float(scale) if isinstance(scale, (int, float)) else d_head**-0.5

        def qkv(caps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return qkv_rows(caps, None)

        def qkv_rows(
            caps: dict[str, torch.Tensor], rows: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """q (at ``rows`` only, when given), k, v from the captured attention input."""
            u = caps["attn_in"]  # [B, N, d], the ln_1 output as attn received it
            if u.dim() != 3 or u.shape[-1] != d:
                raise UnsupportedModelError(f"{name}: input {tuple(u.shape)} is not [B, N, {d}]")
            if layout.batch is not None and u.shape[0] != layout.batch and u.shape[1] == layout.batch:
                raise UnsupportedModelError(
                    f"{name}: input {tuple(u.shape)} is sequence-first ([N, B, d]) for a batch of "
                    f"{layout.batch}; vitdecomp reads the residual stream batch-first [B, N, d]"
                )
            b, n, _ = u.shape
            w, bias = w_in.to(u.dtype), b_in.to(u.dtype) if b_in is not None else None
            if rows is None:
                x = torch.nn.functional.linear(u, w, bias)
                q, k, v = x.reshape(b, n, 3, n_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, dh]
            else:  # keys and values at every token, queries only where the readout looks
                kv = torch.nn.functional.linear(u, w[d:], bias[d:] if bias is not None else None)
                k, v = kv.reshape(b, n, 2, n_heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)
                q = torch.nn.functional.linear(u[:, rows], w[:d], bias[:d] if bias is not None else None)
                q = q.reshape(b, len(rows), n_heads, d_head).transpose(1, 2)  # [B, H, |S|, dh]
            if isinstance(ln_q, nn.Module) and not isinstance(ln_q, nn.Identity):  # qk-norm per head
                q = ln_q(q)
            if isinstance(ln_k, nn.Module) and not isinstance(ln_k, nn.Identity):
                k = ln_k(k)
            return q, k, v

        return AttentionMap(
            n_heads=n_heads,
            d_head=d_head,
            scale=scale,
            w_out=w_out,
            b_out=out_proj.bias,
            v_bias=v_bias,
            captures=[CapturePoint(attn, "input", "attn_in")],
            qkv=qkv,
            qkv_rows=qkv_rows,
        )

    def _block(self, i: int, blk: Any, transformer_batch_first: bool | None, layout: _Layout) -> BlockMap:
        from torch import nn

        name = f"transformer.resblocks.{i}"
        for needed in ("ln_1", "attn", "ln_2", "mlp"):
            if getattr(blk, needed, None) is None:
                raise UnsupportedModelError(f"{name}: block {type(blk).__name__} has no `{needed}`")
        if not _is_identity(getattr(blk, "ln_attn", None)):
            raise UnsupportedModelError(
                f"{name}.ln_attn: a norm after attention (`scale_attn=True`) normalises the sum of the "
                "heads, so heads are no longer separable"
            )
        attn = self._attention(f"{name}.attn", blk.attn, transformer_batch_first, layout)
        ls_2 = getattr(blk, "ls_2", None)
        gamma2 = layer_scale_gamma(ls_2, f"{name}.ls_2")
        c_proj = getattr(blk.mlp, "c_proj", None)
        hidden = w_mlp = b_mlp = None
        if isinstance(c_proj, nn.Linear):
            hidden = CapturePoint(c_proj, "input", "mlp_hidden")
            w_mlp = c_proj.weight.T if gamma2 is None else c_proj.weight.T * gamma2  # [d_mlp, d]
            if c_proj.bias is not None:
                b_mlp = c_proj.bias if gamma2 is None else c_proj.bias * gamma2
        return BlockMap(
            module=blk,
            attn=attn,
            ls1=layer_scale_gamma(getattr(blk, "ls_1", None), f"{name}.ls_1"),
            mlp_write=CapturePoint(ls_2 if ls_2 is not None else blk.mlp, "output", "mlp_write"),
            mlp_hidden=hidden,
            w_mlp_out=w_mlp,
            b_mlp_out=b_mlp,
        )

    # ---------------------------------------------------------------- towers
    def _vit_tower_map(self, tower: Any, layout: _Layout) -> ViTMap:
        """An open_clip ``VisionTransformer`` (forward set by the caller)."""
        import torch

        if getattr(tower, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                "attn_pool: open_clip's AttentionalPooler (CoCa-style, many learned queries, then ln_post "
                "and a token pool) is not supported by the ViT engine yet"
            )
        pool = getattr(tower, "pool_type", "tok")
        if pool not in ("tok", "avg"):
            raise UnsupportedModelError(
                f"pool_type={pool!r}: only 'tok' (CLS) and 'avg' pooling give one vector per image"
            )
        if getattr(tower, "class_embedding", None) is None:
            raise UnsupportedModelError("no `class_embedding`: the tower is expected to prepend one CLS token")
        for mod_name, mod in tower.named_modules():
            weight = getattr(mod, "weight", None)
            is_fp32_norm = type(mod).__name__ == "LayerNormFp32"
            if is_fp32_norm and isinstance(weight, torch.Tensor) and weight.dtype == torch.float64:
                raise UnsupportedModelError(
                    f"{mod_name}: open_clip's LayerNormFp32 computes in float32, so this model cannot run "
                    "with float64 weights; decompose it in float32 (the default)"
                )
        ln_post = getattr(tower, "ln_post", None)
        norm = FrozenNorm.from_module(ln_post, "ln_post")
        after = bool(getattr(tower, "final_ln_after_pool", False))
        proj = getattr(tower, "proj", None)
        if proj is not None and (not isinstance(proj, torch.Tensor) or proj.dim() != 2):
            raise UnsupportedModelError(f"proj: expected a [width, d_z] matrix, got {type(proj).__name__}")
        readout = ViTReadout(
            token_norm=None if after else norm,
            pool="cls" if pool == "tok" else "avg",
            pooled_norm=norm if after else None,
            proj=proj,
            pool_start=1,  # open_clip's avg pool is x[:, 1:].mean(1)
        )
        transformer = tower.transformer
        batch_first = getattr(transformer, "batch_first", None)
        if batch_first is False:
            raise UnsupportedModelError(
                "transformer.batch_first=False: the blocks run sequence-first ([N, B, d]); vitdecomp reads "
                "the residual stream batch-first [B, N, d]"
            )
        blocks = [self._block(i, blk, batch_first, layout) for i, blk in enumerate(transformer.resblocks)]
        patch = getattr(tower, "patch_size", None) or tower.conv1.kernel_size
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
        return ViTMap(
            blocks=blocks,
            readout=readout,
            n_prefix=1,
            prefix_types=("cls",),
            patch_size=(int(patch[0]), int(patch[1])),
            forward=lambda x: x,  # replaced by the caller
        )

    def _timm_tower_map(self, tower: Any) -> ViTMap:
        """A ``TimmModel`` tower: the timm adapter reads the trunk, the linear heads fold into ``proj``."""
        from torch import nn

        from .timm_vit import TimmViTAdapter

        trunk = tower.trunk
        inner = TimmViTAdapter()
        if not inner.matches(trunk):
            raise UnsupportedModelError(
                f"visual.trunk: a timm {type(trunk).__name__} inside open_clip's TimmModel; only timm "
                "VisionTransformer trunks are read here"
            )
        vmap = inner.vit_map(trunk)
        linears: list[tuple[str, nn.Linear]] = []
        trunk_head = getattr(trunk, "head", None)
        if isinstance(trunk_head, nn.Linear):
            linears.append(("visual.trunk.head", trunk_head))
        elif not _is_identity(trunk_head):
            raise UnsupportedModelError(f"visual.trunk.head: {type(trunk_head).__name__} is not a linear head")
        for child_name, child in tower.head.named_children():
            if isinstance(child, (nn.Dropout, nn.Identity)):
                continue
            if not isinstance(child, nn.Linear):
                raise UnsupportedModelError(
                    f"visual.head.{child_name}: {type(child).__name__} (an MLP or attention-pool head) is not "
                    "linear; only `timm_proj='linear'` or `'none'` towers are supported"
                )
            linears.append((f"visual.head.{child_name}", child))
        readout = vmap.readout
        proj, bias = readout.proj, readout.proj_bias
        for _, lin in linears:  # z -> z W^T + b, composed left to right
            proj = lin.weight.T if proj is None else proj @ lin.weight.T
            if bias is not None:
                bias = bias @ lin.weight.T
            if lin.bias is not None:
                bias = lin.bias if bias is None else bias + lin.bias
        vmap.readout = dataclasses.replace(readout, proj=proj, proj_bias=bias)
        return vmap

    def vit_map(self, module: nn.Module) -> ViTMap:
        """Read a tower or a whole CLIP model; raises :class:`UnsupportedModelError` if not exact."""
        tower = _vision_tower(module)
        if tower is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} is neither an open_clip VisionTransformer/TimmModel tower nor a "
                "model with one as `.visual`"
            )
        layout = _Layout()
        vmap = self._timm_tower_map(tower) if _is_timm_tower(tower) else self._vit_tower_map(tower, layout)
        vmap.forward = _forward(module, tower, layout)
        return vmap

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        """The tower's ``preprocess_cfg`` (set by open_clip's factory), else its legacy attributes
        (``image_size``, ``image_mean``, ``image_std``), else open_clip's defaults (OpenAI mean/std)."""
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict

        tower = _vision_tower(module)
        cfg: dict[str, Any] = dict(getattr(tower, "preprocess_cfg", None) or {})
        for key, attr in (("mean", "image_mean"), ("std", "image_std")):
            if cfg.get(key) is None and getattr(tower, attr, None) is not None:
                cfg[key] = getattr(tower, attr)
        full = merge_preprocess_dict(PreprocessCfg(), cfg)
        size = getattr(tower, "image_size", None) or full["size"]  # the built size wins
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        resize = str(full.get("resize_mode", "shortest"))
        if resize not in ("shortest", "squash"):
            log.warning("open_clip resize_mode=%r has no vitdecomp equivalent; using resize + centre crop", resize)
        return Preprocessing(
            input_size=(int(size[0]), int(size[1])),
            mean=tuple(float(v) for v in full["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in full["std"]),  # type: ignore[arg-type]
            interpolation=str(full.get("interpolation", "bicubic")),
            crop_pct=1.0,
            resize_mode="squash" if resize == "squash" else "shortest_crop",
            source="open_clip.preprocess_cfg",
        )

    def classifier(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """None: CLIP towers have no classifier (zero-shot heads come from text embeddings)."""
        return None


def _forward(module: Any, tower: Any, layout: _Layout) -> Callable[[torch.Tensor], torch.Tensor]:
    """The stock representation ``[B, d_z]``: ``encode_image`` of a whole model, else the tower."""
    whole = module is not tower

    def forward(x: torch.Tensor) -> torch.Tensor:
        layout.batch = int(x.shape[0])
        out = module.encode_image(x) if whole else tower(x)
        if isinstance(out, (tuple, list)):  # output_tokens=True: (pooled, tokens)
            out = out[0]
        return out

    return forward


register_adapter(OpenClipViTAdapter())


# -------------------------------------------------------------------- loading
def _offline() -> bool:
    from ..model import hub_offline

    return hub_offline()


def _cached_weights(tag_cfg: dict[str, Any]) -> str | None:
    """Where a tag's weights are in the local cache, or None; mirrors open_clip's source choice
    (the Hugging Face hub when the tag has one and huggingface_hub is installed, else the URL)."""
    if "file" in tag_cfg:
        return str(tag_cfg["file"])
    hub, url = tag_cfg.get("hf_hub", ""), tag_cfg.get("url", "")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        try_to_load_from_cache = None  # type: ignore[assignment]
    if hub and try_to_load_from_cache is not None:
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        repo, filename = os.path.split(hub)  # "org/repo/" means the default file name
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for fname in names:
            found = try_to_load_from_cache(repo, fname)
            if isinstance(found, str):
                return found
        return None
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        return str(path) if path.is_file() else None
    return None


def _dir_digest(directory: Path) -> str:
    """sha256 (16 hex) over the weight files of a local model directory."""
    from ..model import file_sha256

    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".pth", ".pt"):
            digest.update(path.name.encode())
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def _unknown_arch(arch: str, models: list[str]) -> InputError:
    close = difflib.get_close_matches(arch, models, n=6, cutoff=0.5)
    if not close:
        close = [m for m in models if arch.lower()[:6] in m.lower()][:6]
    return InputError(
        f"open_clip has no architecture {arch!r}; similar: {close or 'none'}. "
        f"See open_clip.list_models() ({len(models)} architectures)."
    )


def load_open_clip(rest: str, *, pretrained: bool, checkpoint: Path | None = None) -> Model:
    """Build an open_clip model with ``open_clip.create_model_and_transforms`` (``vd.load("open_clip:...")``).

    Args:
        rest: ``ARCH`` or ``ARCH:TAG`` (``"ViT-B-16:laion2b_s34b_b88k"``), or open_clip's own
            ``hf-hub:ORG/REPO`` / ``local-dir:PATH`` (config and weights from there).
        pretrained: load the tag's weights (``ARCH`` alone: open_clip's first tag for it),
            from the local cache when offline. False: random init, offline; a tag then only
            sets the preprocessing and QuickGELU to the tag's.
        checkpoint: a local state dict of the *whole* CLIP model (as open_clip saves it),
            loaded strictly after random init; no download.

    Returns:
        A :class:`~vitdecomp.core.model.Model` over the whole CLIP model (decomposed through its
        ``.visual`` tower, representation ``encode_image``), with open_clip's eval transform,
        ``extras["clip"]`` the CLIP model and ``extras["tokenizer"]`` its tokenizer (None
        when the tokenizer cannot be built offline).

    Raises:
        InputError: unknown architecture or tag; an arch without pretrained weights.
        WeightsUnavailableError: weights (or a hub config) not in the cache and not fetchable;
            with ``HF_HUB_OFFLINE=1`` this is decided from the cache, without a network attempt.
    """
    import open_clip

    from ..model import Model, load_checkpoint, weights_unavailable

    spec = f"open_clip:{rest}"
    use_hub = pretrained and checkpoint is None
    tag: str | None = None
    tag_cfg: dict[str, Any] = {}
    local: Path | None = None
    if rest.startswith(_SCHEMAS):
        model_name = rest
        if rest.startswith("local-dir:"):
            local = Path(rest[len("local-dir:") :]).expanduser()
            if not (local / "open_clip_config.json").is_file():
                raise InputError(f"{spec}: {local} is not an open_clip model directory (no open_clip_config.json)")
    else:
        arch, _, tag_part = rest.partition(":")
        arch = arch.replace("/", "-")
        models = open_clip.list_models()
        if arch not in models:
            raise _unknown_arch(arch, models)
        model_name = arch
        tags = open_clip.list_pretrained_tags_by_model(arch)
        tag = tag_part or None
        if tag is None and use_hub:
            if not tags:
                raise InputError(
                    f"open_clip has no pretrained weights for {arch!r}; use pretrained=False (random init) "
                    "or checkpoint=FILE"
                )
            tag = tags[0]
            log.info("%s: no tag given, using open_clip's first pretrained tag %r", spec, tag)
        if tag is not None:
            tag_cfg = dict(open_clip.get_pretrained_cfg(arch, tag))
            if not tag_cfg:
                raise InputError(f"open_clip has no pretrained tag {tag!r} for {arch!r}; tags: {tags or 'none'}")
            canonical = tag.lower().replace("-", "_")  # open_clip's own tag normalisation
            tag = canonical if canonical in tags else tag
        if use_hub and _offline() and _cached_weights(tag_cfg) is None:
            raise weights_unavailable(
                f"open_clip:{arch}:{tag}",
                FileNotFoundError("not in the local cache, and HF_HUB_OFFLINE is set"),
            )

    # no base-tower downloads: weights come from the tag, the checkpoint, or nowhere (random init)
    kwargs: dict[str, Any] = {"pretrained_text": False, "pretrained_image": False}
    if tag_cfg:
        kwargs.update(
            image_mean=tag_cfg.get("mean"),
            image_std=tag_cfg.get("std"),
            image_interpolation=tag_cfg.get("interpolation"),
            image_resize_mode=tag_cfg.get("resize_mode"),
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        )
    if model_name.startswith(_SCHEMAS):
        kwargs.update(load_weights=use_hub, require_pretrained=use_hub)
    else:
        kwargs.update(pretrained=tag if use_hub else None, require_pretrained=use_hub)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model_name, **kwargs)
    except Exception as exc:
        if use_hub or isinstance(exc, OSError) or model_name.startswith("hf-hub:"):
            raise weights_unavailable(spec if tag is None else f"open_clip:{model_name}:{tag}", exc) from exc
        raise
    if not use_hub:
        weights = "random-init"
    elif tag is not None:
        weights = f"pretrained:open_clip/{model_name}/{tag}"
    elif local is not None:
        weights = f"pretrained:open_clip/local-dir:{local.name}@sha256:{_dir_digest(local)}"
    else:
        weights = f"pretrained:open_clip/{model_name}"
    if checkpoint is not None:
        weights = load_checkpoint(clip, Path(checkpoint))
    clip.eval()
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # noqa: BLE001  (e.g. an HF tokenizer that is not in the cache)
        log.warning("%s: no tokenizer (%s: %s); text features will need one", spec, type(exc).__name__, exc)
        tokenizer = None
    log.info("loaded %s as %s (%s)", spec, type(clip).__name__, weights)
    return Model(clip, name=spec, weights=weights, transform=preprocess, extras={"clip": clip, "tokenizer": tokenizer})
