"""Hugging Face ``transformers`` ViTs: CLIP and SigLIP vision towers, ViT, DINOv2 (+/- registers).

Supported classes and the representation each one is decomposed into (``d``: width,
``d_z``: output width; always computed by the stock module's own forward):

====================================  =====================================================
class                                 representation ``[batch, d_z]``
====================================  =====================================================
``CLIPVisionModel``                   ``pooler_output`` = ``post_layernorm(x_L[:, 0])``
``CLIPVisionModelWithProjection``     ``image_embeds`` = ``visual_projection(pooler_output)``
``CLIPModel`` (image tower)           ``get_image_features(pixel_values)`` (same as above);
                                      the whole model is kept in ``Model.extras["clip"]``
``CLIPForImageClassification``        the classifier's input, ``mean(x_L[:, 1:])``
``ViTModel``                          ``last_hidden_state[:, 0]`` = ``layernorm(x_L)[:, 0]``
``ViTForImageClassification``         the classifier's input (pre-logits), same as above;
                                      logits = ``stack.project(W).total() + b``
``Dinov2Model``                       ``pooler_output`` = ``layernorm(x_L)[:, 0]``
``Dinov2WithRegistersModel``          ``pooler_output``; tokens are CLS, registers, patches
``SiglipVisionModel``                 ``pooler_output`` = ``head(post_layernorm(x_L))``, the
                                      attention-pooling (MAP) head; no CLS token
``SiglipModel`` (image tower)         ``get_image_features(pixel_values).pooler_output`` (same
                                      as above); the whole model is kept in ``Model.extras["clip"]``
``SiglipForImageClassification``      the classifier's input, ``mean(post_layernorm(x_L))``
====================================  =====================================================

SigLIP's ``SiglipMultiheadAttentionPoolingHead`` computes ``a = MHA(probe, y, y)`` (one learned
query, ``torch.nn.MultiheadAttention``) and ``z = a + mlp(layernorm(a))``. It is read as an
:class:`~vitdecomp.core.readout.AttentionPool` (docs/method.md §2.4): ``post_layernorm`` is the per-token
norm, every pool head is one *route* ``W_V^r W_O^r`` with its frozen pattern
``softmax(q_probe^r k^r(y)^T / sqrt(d_h))``, and ``mlp(layernorm(a))`` is one non-linear leaf,
``pool_mlp``. With ``vision_use_head=False`` transformers' ``pooler_output`` is None; the
representation is then the mean of ``last_hidden_state`` (the post-layernormed tokens), as
``SiglipForImageClassification`` and big_vision's ``pool_type='gap'`` pool them, and
``representation="pooler_output"`` raises UnsupportedModelError. SigLIP 2
(``Siglip2*``, NaFlex) is refused: its inputs are patch sequences with per-image
``spatial_shapes`` and a padding mask, not a pixel batch.

``ViTModel.pooler`` (``dense`` then ``tanh``) is non-linear, so by default it is **not**
part of the representation: ``ViTModel`` is decomposed at ``last_hidden_state[:, 0]``.
``HFViTAdapter(representation="pooler_output")`` asks for the stock ``pooler_output``
instead; for ViT that is exact only with ``pooler_act="linear"`` and raises
:class:`~vitdecomp.errors.UnsupportedModelError` otherwise.

Module paths read (checked, since they changed between transformers 4.x and 5.x):

* layers: ``encoder.layers`` (CLIP), ``layers`` (ViT 5.x), ``encoder.layer`` (ViT 4.x, DINOv2);
* attention: ``self_attn.{q,k,v,out}_proj`` (CLIP), ``attention.{q,k,v,o}_proj`` (5.x),
  ``attention.attention.{query,key,value}`` + ``attention.output.dense`` (4.x); the
  attention module may hold no other parameter or buffer (no relative bias, no qk-norm);
* MLP write: ``mlp`` output (CLIP, ViT 5.x), ``output.dense`` output (ViT 4.x, whose
  ``ViTOutput`` adds the residual itself), ``layer_scale2`` output (DINOv2);
* neurons: input of ``mlp.fc2`` / ``mlp.down_proj`` / ``mlp.weights_out`` (SwiGLU) /
  ``output.dense``, with the LayerScale ``layer_scale2.lambda1`` folded into ``W_out``;
* readout: ``post_layernorm`` (CLIP, after pooling; SigLIP, before pooling), ``layernorm``
  (ViT, DINOv2, before pooling), ``visual_projection`` (no bias in CLIP; a bias would be read);
  SigLIP's ``head.{probe, attention.{in_proj_weight, in_proj_bias, out_proj}, layernorm, mlp}``.

Eager, SDPA and the other attention implementations all work: the engine recomputes the
pattern rows from the captured ``q``/``k`` projections. ``interpolate_pos_encoding`` is
left as the stock forward has it (DINOv2 always interpolates; CLIP/ViT need the built size).

``transformers`` is imported only inside functions, so ``import vitdecomp`` stays light.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ...errors import InputError, UnsupportedModelError
from ..readout import AttentionPool, FrozenNorm, ViTReadout
from .base import AttentionMap, BlockMap, CapturePoint, Preprocessing, ViTMap, register_adapter

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..model import Model

__all__ = ["HFViTAdapter", "load_hf", "preprocessing_from_processor"]

log = logging.getLogger(__name__)

Representation = Literal["default", "pooler_output"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# Model classes this adapter reads, by family ("clip", "vit", "dinov2").
_SUPPORTED: dict[str, str] = {
    "CLIPVisionModel": "clip",
    "CLIPVisionModelWithProjection": "clip",
    "CLIPModel": "clip",
    "CLIPForImageClassification": "clip",
    "CLIPVisionTransformer": "clip",  # transformers 4.x: the tower inside CLIPVisionModel
    "ViTModel": "vit",
    "ViTForImageClassification": "vit",
    "Dinov2Model": "dinov2",
    "Dinov2WithRegistersModel": "dinov2",
    "SiglipVisionModel": "siglip",
    "SiglipModel": "siglip",
    "SiglipForImageClassification": "siglip",
    "SiglipVisionTransformer": "siglip",  # transformers 4.x: the tower inside SiglipVisionModel
}

_SIGLIP2 = (
    "SigLIP 2 (NaFlex) takes patchified pixel sequences with per-image `spatial_shapes` and a "
    "`pixel_attention_mask` (variable resolution, position embeddings resized per image, masked "
    "attention and masked pooling), not a [batch, 3, H, W] pixel batch; vitdecomp's engine reads "
    "fixed-grid towers only. Use a SigLIP (v1) checkpoint, or the timm/open_clip build of a "
    "fixed-resolution SigLIP 2 tower"
)

# Classes recognised but refused, with the reason and what to do instead.
_REFUSED: dict[str, str] = {
    "Dinov2ForImageClassification": (
        "the classifier reads the concatenation [CLS ; mean(patches)] (2d wide), which is not one "
        "pooled vector; wrap `model.dinov2` (the Dinov2Model) and project onto the two halves of "
        "`classifier.weight` yourself"
    ),
    "Dinov2WithRegistersForImageClassification": (
        "the classifier reads the concatenation [CLS ; mean(patches)] (2d wide), which is not one "
        "pooled vector; wrap `model.dinov2_with_registers` instead"
    ),
    "Dinov2Backbone": "a backbone returns feature maps of several stages, not one representation; wrap a Dinov2Model",
    "Dinov2WithRegistersBackbone": (
        "a backbone returns feature maps, not one representation; wrap a Dinov2WithRegistersModel"
    ),
    "ViTForMaskedImageModeling": "the output is a reconstructed image, not a representation; wrap `model.vit`",
    "CLIPTextModel": "a text tower; vitdecomp decomposes image towers (use CLIPModel or CLIPVisionModel)",
    "CLIPTextModelWithProjection": "a text tower; vitdecomp decomposes image towers",
    "SiglipTextModel": "a text tower; vitdecomp decomposes image towers (use SiglipModel or SiglipVisionModel)",
    "Siglip2VisionModel": _SIGLIP2,
    "Siglip2Model": _SIGLIP2,
    "Siglip2ForImageClassification": _SIGLIP2,
    "Siglip2VisionTransformer": _SIGLIP2,
    "Siglip2TextModel": "a text tower; vitdecomp decomposes image towers",
}

# Encoder-layer classes whose forward is the pre-norm block x + [ls1*]attn(norm1 x), + [ls2*]mlp(norm2 .).
_LAYER_CLASSES = ("CLIPEncoderLayer", "SiglipEncoderLayer", "ViTLayer", "Dinov2Layer", "Dinov2WithRegistersLayer")

# (q, k, v, out) projection paths inside an encoder layer, newest layout first.
_ATTN_LAYOUTS: tuple[tuple[str, str, str, str], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),  # CLIP
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),  # ViT/DINOv2 5.x
    ("attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense"),
)

# Output projections of the MLP (their input is the hidden activation, one column per neuron).
_MLP_OUT = ("mlp.fc2", "mlp.down_proj", "mlp.weights_out", "output.dense")

# Children of an encoder layer that may hold parameters: norms, attention, MLP, layer scales.
_LAYER_CHILDREN = frozenset(
    {
        "layer_norm1",
        "layer_norm2",
        "layernorm_before",
        "layernorm_after",
        "norm1",
        "norm2",
        "self_attn",
        "attention",
        "mlp",
        "intermediate",
        "output",
        "layer_scale1",
        "layer_scale2",
    }
)


def _known_name(module: Any, names: Any) -> str | None:
    """The first class in ``type(module).__mro__`` defined by transformers whose name is in ``names``."""
    for klass in type(module).__mro__:
        if klass.__module__.startswith("transformers.") and klass.__name__ in names:
            return klass.__name__
    return None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    """``root.get_submodule(path)`` or None when any part is missing (or None)."""
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _output_field(out: Any, field: str) -> torch.Tensor:
    """``out.<field>`` of a ModelOutput (or ``out`` itself when a version returns a tensor)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    value = getattr(out, field, None)
    if value is None and isinstance(out, (tuple, list)):
        raise UnsupportedModelError(f"the forward returned a tuple without a `{field}` field; pass return_dict=True")
    if not isinstance(value, torch.Tensor):
        raise UnsupportedModelError(f"the forward returned no `{field}` tensor (got {type(value).__name__})")
    return value


@dataclass
class _Tower:
    """Where the parts of one supported model live."""

    name: str  # the matched transformers class
    family: str  # "clip" | "siglip" | "vit" | "dinov2"
    core: nn.Module  # module owning `embeddings` and the layers
    core_path: str  # its path in the wrapped module ("" for the module itself)
    config: Any  # the vision config


class HFViTAdapter:
    """Reads transformers CLIP and SigLIP vision towers, ViT and DINOv2 (+registers); see the module docstring.

    Args:
        representation: ``"default"`` (the table in the module docstring) or
            ``"pooler_output"``: the base model's stock ``pooler_output`` (before any
            projection or classifier). For ``ViTModel`` that means ``tanh(dense(.))``,
            which cannot be split exactly and raises UnsupportedModelError; a SigLIP tower
            built with ``vision_use_head=False`` has none and raises too.
    """

    family = "hf-vit"
    description = (
        "transformers CLIPVisionModel(+WithProjection), CLIPModel image tower, CLIPForImageClassification, "
        "SiglipVisionModel, SiglipModel image tower, SiglipForImageClassification (MAP attention pooling), "
        "ViTModel, ViTForImageClassification, Dinov2Model, Dinov2WithRegistersModel"
    )

    def __init__(self, representation: Representation = "default") -> None:
        if representation not in ("default", "pooler_output"):
            raise InputError(f"representation must be 'default' or 'pooler_output', got {representation!r}")
        self.representation: Representation = representation

    # ------------------------------------------------------------------ matching
    def matches(self, module: nn.Module) -> bool:
        return _known_name(module, _SUPPORTED.keys() | _REFUSED.keys()) is not None

    def _tower(self, module: nn.Module) -> _Tower:
        name = _known_name(module, _SUPPORTED.keys() | _REFUSED.keys())
        if name is None:
            raise UnsupportedModelError(f"{type(module).__name__} is not a transformers model this adapter reads")
        if name in _REFUSED:
            raise UnsupportedModelError(f"{name}: {_REFUSED[name]}")
        family = _SUPPORTED[name]
        m: Any = module
        core: Any = m
        path = ""
        if family in ("clip", "siglip"):
            # 5.x: CLIP/SiglipVisionModel owns `encoder`; 4.x: it wraps a *VisionTransformer `vision_model`.
            while getattr(core, "encoder", None) is None and getattr(core, "vision_model", None) is not None:
                core = core.vision_model
                path = f"{path}.vision_model".lstrip(".")
        elif name == "ViTForImageClassification":
            core, path = m.vit, "vit"
        if getattr(core, "embeddings", None) is None:
            raise UnsupportedModelError(f"{name}: no `embeddings` module at {path or 'the top level'}")
        config = getattr(core, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{name}: no `config` at {path or 'the top level'}")
        return _Tower(name=name, family=family, core=core, core_path=path, config=config)

    # ------------------------------------------------------------------ blocks
    @staticmethod
    def _layers(tower: _Tower) -> list[tuple[str, nn.Module]]:
        from torch import nn

        for rel in ("encoder.layers", "encoder.layer", "layers"):
            found = _submodule(tower.core, rel)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                prefix = f"{tower.core_path}.{rel}".lstrip(".")
                return [(f"{prefix}.{i}", layer) for i, layer in enumerate(found)]
        raise UnsupportedModelError(
            f"{tower.name}: found no encoder layers (looked for encoder.layers, encoder.layer, layers)"
        )

    def _block(self, name: str, layer: nn.Module, config: Any) -> BlockMap:
        from torch import nn

        if _known_name(layer, _LAYER_CLASSES) is None:
            raise UnsupportedModelError(
                f"{name}: layer type {type(layer).__name__} is not one of the pre-norm layers vitdecomp reads "
                f"({', '.join(_LAYER_CLASSES)})"
            )
        for child, sub in layer.named_children():
            if child not in _LAYER_CHILDREN and any(True for _ in sub.parameters()):
                raise UnsupportedModelError(
                    f"{name}.{child}: unexpected module {type(sub).__name__} with parameters inside the layer; "
                    "vitdecomp cannot tell how it enters the residual stream"
                )

        # ---- attention: separate q/k/v Linear modules and an output Linear
        layout = None
        for paths in _ATTN_LAYOUTS:
            mods = [_submodule(layer, p) for p in paths]
            if all(isinstance(mod, nn.Linear) for mod in mods):
                layout = (paths, mods)
                break
        if layout is None:
            import transformers

            raise UnsupportedModelError(
                f"{name}: no separate q/k/v/output Linear projections at any known path "
                f"({'; '.join(', '.join(p) for p in _ATTN_LAYOUTS)}) in transformers {transformers.__version__}"
            )
        paths, (q_lin, k_lin, v_lin, o_lin) = layout  # type: ignore[misc]
        attn_path = paths[0].split(".")[0]
        attn_mod = _submodule(layer, attn_path)
        self_attn = _submodule(layer, paths[0].rsplit(".", 1)[0])  # the module owning q/k/v
        assert attn_mod is not None and self_attn is not None
        expected = {f"{p[len(attn_path) + 1 :]}.{w}" for p in paths for w in ("weight", "bias")}
        for pname, _ in attn_mod.named_parameters():
            if pname not in expected:
                raise UnsupportedModelError(
                    f"{name}.{attn_path}.{pname}: unexpected attention parameter (relative position bias, "
                    "qk-norm, gating...); only plain softmax(q k^T * scale) v attention is read"
                )
        for bname, _ in attn_mod.named_buffers():
            raise UnsupportedModelError(f"{name}.{attn_path}.{bname}: unexpected attention buffer (a bias or mask?)")
        for mod in (attn_mod, self_attn):
            if getattr(mod, "is_causal", False):
                raise UnsupportedModelError(f"{name}.{attn_path}: causal attention is not a vision encoder")

        n_heads = None
        for mod in (self_attn, attn_mod):
            for attr in ("num_heads", "num_attention_heads"):
                if isinstance(getattr(mod, attr, None), int):
                    n_heads = int(getattr(mod, attr))
                    break
            if n_heads is not None:
                break
        if n_heads is None:
            n_heads = int(config.num_attention_heads)
        width = q_lin.out_features
        if not (k_lin.out_features == v_lin.out_features == o_lin.in_features == width) or width % n_heads:
            raise UnsupportedModelError(
                f"{name}.{attn_path}: projection widths q {q_lin.out_features}, k {k_lin.out_features}, "
                f"v {v_lin.out_features}, out {o_lin.in_features} do not split into {n_heads} equal heads"
            )
        d_head = width // n_heads
        for attr in ("head_dim", "attention_head_size"):
            declared = getattr(self_attn, attr, None)
            if isinstance(declared, int) and declared != d_head:
                raise UnsupportedModelError(f"{name}.{attn_path}: {attr}={declared} but the projections give {d_head}")
        scale = d_head**-0.5
        for attr in ("scale", "scaling"):
            declared = getattr(self_attn, attr, None)
            if isinstance(declared, (int, float)) and not isinstance(declared, bool):
                scale = float(declared)
                break

        d = o_lin.out_features
        w_out = o_lin.weight.T.reshape(n_heads, d_head, d)  # [H, dh, d]
        v_bias = v_lin.bias.reshape(n_heads, d_head) if v_lin.bias is not None else None

        def qkv(caps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            def heads(x: torch.Tensor) -> torch.Tensor:  # [B, N, H*dh] -> [B, H, N, dh]
                b, n, _ = x.shape
                return x.reshape(b, n, n_heads, d_head).transpose(1, 2)

            return heads(caps["q"]), heads(caps["k"]), heads(caps["v"])

        # ---- layer scales (DINOv2) and the MLP write
        ls1 = self._layer_scale(name, layer, "layer_scale1")
        ls2 = self._layer_scale(name, layer, "layer_scale2")
        intermediate = _submodule(layer, "intermediate")
        if ls2 is not None:
            write = CapturePoint(layer.get_submodule("layer_scale2"), "output", "mlp_write")
        elif intermediate is not None and isinstance(_submodule(layer, "output.dense"), nn.Linear):
            write = CapturePoint(layer.get_submodule("output.dense"), "output", "mlp_write")  # ViTOutput adds x itself
        elif _submodule(layer, "mlp") is not None:
            write = CapturePoint(layer.get_submodule("mlp"), "output", "mlp_write")
        else:
            raise UnsupportedModelError(f"{name}: found no MLP (looked for `mlp` and `intermediate`/`output.dense`)")

        fc2 = None
        for path in _MLP_OUT:
            cand = _submodule(layer, path)
            if isinstance(cand, nn.Linear) and cand.out_features == d:
                fc2 = cand
                break
        w_mlp_out = b_mlp_out = None
        hidden = None
        if fc2 is not None:
            w_mlp_out = fc2.weight.T if ls2 is None else fc2.weight.T * ls2  # [d_mlp, d]
            if fc2.bias is not None:
                b_mlp_out = fc2.bias if ls2 is None else fc2.bias * ls2
            hidden = CapturePoint(fc2, "input", "mlp_hidden")

        return BlockMap(
            module=layer,
            attn=AttentionMap(
                n_heads=n_heads,
                d_head=d_head,
                scale=scale,
                w_out=w_out,
                b_out=o_lin.bias,
                v_bias=v_bias,
                captures=[
                    CapturePoint(q_lin, "output", "q"),
                    CapturePoint(k_lin, "output", "k"),
                    CapturePoint(v_lin, "output", "v"),
                ],
                qkv=qkv,
            ),
            ls1=ls1,
            mlp_write=write,
            mlp_hidden=hidden,
            w_mlp_out=w_mlp_out,
            b_mlp_out=b_mlp_out,
        )

    @staticmethod
    def _layer_scale(name: str, layer: nn.Module, child: str) -> torch.Tensor | None:
        """``lambda1 [d]`` of a DINOv2 LayerScale child, None when the layer has none."""
        from torch import nn

        mod = _submodule(layer, child)
        if mod is None or isinstance(mod, nn.Identity):
            return None
        params = dict(mod.named_parameters())
        if set(params) != {"lambda1"} or params["lambda1"].dim() != 1:
            raise UnsupportedModelError(
                f"{name}.{child}: layer scale {type(mod).__name__} has parameters {sorted(params)}, "
                "expected a single vector `lambda1`"
            )
        return params["lambda1"]

    # ------------------------------------------------------------------ readout
    def _readout_and_forward(
        self, module: nn.Module, tower: _Tower, n_prefix: int
    ) -> tuple[ViTReadout, Callable[[torch.Tensor], torch.Tensor]]:
        from torch import nn

        m: Any = module
        core: Any = tower.core
        cp = f"{tower.core_path}." if tower.core_path else ""
        pooler = self.representation == "pooler_output"

        def run(target: Any, x: torch.Tensor) -> Any:
            """``target(pixel_values=x)``; HF's ValueError for a wrong size/channel count -> InputError."""
            try:
                if target is m and tower.name in ("CLIPModel", "SiglipModel"):
                    return m.get_image_features(pixel_values=x)
                return target(pixel_values=x, return_dict=True)
            except ValueError as exc:
                raise InputError(
                    f"{tower.name} rejected pixels of shape {tuple(x.shape)}: {exc} "
                    f"(expected input size {_pair(tower.config.image_size)})"
                ) from exc

        def classifier_input(x: torch.Tensor) -> torch.Tensor:
            """The tensor the stock forward hands to ``classifier`` (its pre-logits features)."""
            from ..capture import hooks

            got: list[torch.Tensor] = []
            with hooks([(m.classifier, "input", got.append)]):
                run(m, x)
            if len(got) != 1:
                raise UnsupportedModelError(f"{tower.name}.classifier was called {len(got)} times in one forward")
            return got[0]

        if tower.family == "siglip":
            return self._siglip_readout(m, tower, run, classifier_input)

        if tower.family == "clip":
            post = FrozenNorm.from_module(core.post_layernorm, f"{cp}post_layernorm")
            if tower.name == "CLIPForImageClassification" and not pooler:
                # logits = classifier(mean(last_hidden_state[:, 1:])): no norm after the last layer
                return ViTReadout(token_norm=None, pool="avg", pooled_norm=None, pool_start=n_prefix), classifier_input
            proj = proj_bias = None
            projection = getattr(m, "visual_projection", None)
            if projection is not None and not pooler:
                if not isinstance(projection, nn.Linear):
                    raise UnsupportedModelError(f"visual_projection: {type(projection).__name__} is not a Linear map")
                proj, proj_bias = projection.weight.T, projection.bias  # [d, d_z]
            readout = ViTReadout(token_norm=None, pool="cls", pooled_norm=post, proj=proj, proj_bias=proj_bias)
            if proj is None:
                return readout, lambda x: _output_field(run(core, x), "pooler_output")
            if tower.name == "CLIPModel":
                return readout, lambda x: _output_field(run(m, x), "pooler_output")  # get_image_features
            return readout, lambda x: _output_field(run(m, x), "image_embeds")

        if getattr(core, "layernorm", None) is None:
            raise UnsupportedModelError(f"{tower.name}: no final `layernorm` at {cp or 'the top level'}")
        norm = FrozenNorm.from_module(core.layernorm, f"{cp}layernorm")  # None for an Identity
        if tower.family == "vit":
            if pooler:
                return self._vit_pooler(tower, norm, run)
            if tower.name == "ViTForImageClassification":
                return ViTReadout(token_norm=norm, pool="cls", pooled_norm=None), classifier_input
            if getattr(core, "pooler", None) is not None:
                log.debug("%s.pooler (dense + activation) is not part of the representation", tower.name)
            return ViTReadout(token_norm=norm, pool="cls", pooled_norm=None), lambda x: _output_field(
                run(core, x), "last_hidden_state"
            )[:, 0]
        # DINOv2: pooler_output = layernorm(x_L)[:, 0]
        return ViTReadout(token_norm=norm, pool="cls", pooled_norm=None), lambda x: _output_field(
            run(core, x), "pooler_output"
        )

    def _siglip_readout(
        self,
        module: nn.Module,
        tower: _Tower,
        run: Callable[[Any, torch.Tensor], Any],
        classifier_input: Callable[[torch.Tensor], torch.Tensor],
    ) -> tuple[ViTReadout, Callable[[torch.Tensor], torch.Tensor]]:
        """SigLIP: ``post_layernorm`` on every token, then the MAP head (or the token mean)."""
        m: Any = module
        core: Any = tower.core
        cp = f"{tower.core_path}." if tower.core_path else ""
        if getattr(core, "post_layernorm", None) is None:
            raise UnsupportedModelError(f"{tower.name}: no `post_layernorm` at {cp or 'the top level'}")
        post = FrozenNorm.from_module(core.post_layernorm, f"{cp}post_layernorm")
        head = getattr(core, "head", None)
        use_head = bool(getattr(core, "use_head", getattr(tower.config, "vision_use_head", True)))
        if use_head and head is None:
            raise UnsupportedModelError(
                f"{tower.name}: use_head is set but there is no `head` at {cp or 'the top level'}"
            )
        mean = ViTReadout(token_norm=post, pool="avg", pooled_norm=None, pool_start=0)
        if self.representation == "default" and tower.name == "SiglipForImageClassification":
            # logits = classifier(mean(last_hidden_state)), the head (if built) is not used
            return mean, classifier_input
        if not use_head:
            if self.representation == "pooler_output":
                raise UnsupportedModelError(
                    f"{tower.name}: built with vision_use_head=False, so transformers' pooler_output is None; "
                    "the default representation (the mean of the post-layernormed tokens) can be split"
                )
            log.info("%s has no attention-pooling head; decomposing mean(last_hidden_state)", tower.name)
            return mean, lambda x: _output_field(run(core, x), "last_hidden_state").mean(dim=1)
        readout = ViTReadout(
            token_norm=post,
            pool="attention",
            pooled_norm=None,
            pool_start=0,
            attn_pool=_siglip_attention_pool(head, f"{cp}head"),
        )
        target = m if tower.name == "SiglipModel" and self.representation == "default" else core
        return readout, lambda x: _output_field(run(target, x), "pooler_output")

    @staticmethod
    def _vit_pooler(
        tower: _Tower, norm: FrozenNorm, run: Callable[[Any, torch.Tensor], Any]
    ) -> tuple[ViTReadout, Callable[[torch.Tensor], torch.Tensor]]:
        """``pooler_output = act(dense(layernorm(x_L)[:, 0]))``: exact only for an identity ``act``."""
        from torch import nn

        core: Any = tower.core
        cp = f"{tower.core_path}." if tower.core_path else ""
        pool = getattr(core, "pooler", None)
        if pool is None:
            raise UnsupportedModelError(
                f"{tower.name}: representation='pooler_output' but the model has no pooler "
                "(built with add_pooling_layer=False); use the default representation"
            )
        act = getattr(pool, "activation", None)
        dense = getattr(pool, "dense", None)
        if not isinstance(dense, nn.Linear) or type(act).__name__ not in ("LinearActivation", "Identity"):
            raise UnsupportedModelError(
                f"{cp}pooler: dense followed by {type(act).__name__} (pooler_act="
                f"{getattr(tower.config, 'pooler_act', '?')!r}) is non-linear, so the pooler output cannot be split "
                "exactly; the default representation last_hidden_state[:, 0] (final layernorm of CLS) can"
            )
        readout = ViTReadout(token_norm=norm, pool="cls", pooled_norm=None, proj=dense.weight.T, proj_bias=dense.bias)
        return readout, lambda x: _output_field(run(core, x), "pooler_output")

    # ------------------------------------------------------------------ adapter API
    def vit_map(self, module: nn.Module) -> ViTMap:
        tower = self._tower(module)
        layers = self._layers(tower)
        blocks = [self._block(name, layer, tower.config) for name, layer in layers]
        n_reg = 0
        registers = getattr(tower.core.embeddings, "register_tokens", None)
        if registers is not None:
            n_reg = int(registers.shape[1])
            declared = getattr(tower.config, "num_register_tokens", n_reg)
            if declared != n_reg:
                raise UnsupportedModelError(f"{tower.name}: {n_reg} register tokens but config says {declared}")
        has_cls = tower.family != "siglip"  # SigLIP has patch tokens only
        if not has_cls and (getattr(tower.core.embeddings, "class_embedding", None) is not None or n_reg):
            raise UnsupportedModelError(f"{tower.name}: a SigLIP tower with a class or register token is not supported")
        n_prefix = int(has_cls) + n_reg
        readout, forward = self._readout_and_forward(module, tower, n_prefix)
        return ViTMap(
            blocks=blocks,
            readout=readout,
            n_prefix=n_prefix,
            prefix_types=("cls",) * int(has_cls) + ("reg",) * n_reg,
            patch_size=_pair(tower.config.patch_size),
            forward=forward,
        )

    def preprocessing(self, module: nn.Module) -> Preprocessing:
        """Defaults of each family's stock image processor, at the configured image size.

        CLIP: CLIP mean/std, bicubic shortest-side resize + centre crop (``CLIPImageProcessor``).
        ViT: mean = std = 0.5, bilinear squash to the square size (``ViTImageProcessor``).
        DINOv2: ImageNet mean/std, bicubic resize to 256/224 of the size + centre crop (the
        ``facebook/dinov2-*`` processor configs; ``BitImageProcessor``'s own defaults are CLIP's).
        SigLIP: mean = std = 0.5, bicubic squash to the square size, no crop (``SiglipImageProcessor``).
        ``load("hf:...")`` uses the repository's ``preprocessor_config.json`` instead when it has one.
        """
        tower = self._tower(module)
        size = _pair(tower.config.image_size)
        if tower.family == "clip":
            return Preprocessing(
                size, CLIP_MEAN, CLIP_STD, "bicubic", 1.0, "shortest_crop", "transformers CLIPImageProcessor defaults"
            )
        if tower.family == "vit":
            return Preprocessing(size, HALF, HALF, "bilinear", 1.0, "squash", "transformers ViTImageProcessor defaults")
        if tower.family == "siglip":
            return Preprocessing(
                size, HALF, HALF, "bicubic", 1.0, "squash", "transformers SiglipImageProcessor defaults"
            )
        return Preprocessing(
            size, IMAGENET_MEAN, IMAGENET_STD, "bicubic", 224 / 256, "shortest_crop", "facebook/dinov2 processor config"
        )

    def classifier(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        from torch import nn

        name = _known_name(module, _SUPPORTED.keys())
        head = getattr(module, "classifier", None)
        is_classifier = name in (
            "ViTForImageClassification",
            "CLIPForImageClassification",
            "SiglipForImageClassification",
        )
        if is_classifier and isinstance(head, nn.Linear) and self.representation == "default":
            return head.weight, head.bias
        return None


_POOL_HEAD_PARAMS = frozenset(
    {
        "probe",
        "attention.in_proj_weight",
        "attention.in_proj_bias",
        "attention.out_proj.weight",
        "attention.out_proj.bias",
    }
)


def _siglip_attention_pool(head: Any, name: str) -> AttentionPool:
    """SigLIP's ``SiglipMultiheadAttentionPoolingHead`` read as an :class:`AttentionPool`.

    ``a = MHA(probe, y, y)`` with ``torch.nn.MultiheadAttention`` (packed ``in_proj``,
    ``batch_first``), then ``z = a + mlp(layernorm(a))``: pool head ``r`` is the route
    ``W_V^r W_O^r``, the value and output biases form ``b_vo`` (each pool pattern sums to 1),
    and ``mlp(layernorm(a))`` is captured whole as the ``pool_mlp`` leaf.
    """
    import torch
    from torch import nn

    if _known_name(head, ("SiglipMultiheadAttentionPoolingHead",)) is None:
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


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


register_adapter(HFViTAdapter())


# ---------------------------------------------------------------------- loading
_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # PIL codes


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size if key in ("height", "width", "shortest_edge") else None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def preprocessing_from_processor(processor: Any, fallback: Preprocessing) -> Preprocessing:
    """A :class:`Preprocessing` from a transformers image processor's settings.

    ``size={"shortest_edge": s}`` + ``crop_size`` ``(h, w)`` -> resize shortest side then
    centre crop (``crop_pct = min(h, w) / s``); ``size={"height", "width"}`` without a crop ->
    squash. Settings that do not map (no normalisation, an unusual rescale factor) are logged
    and the fallback's values are kept for them.

    Args:
        processor: e.g. ``AutoImageProcessor.from_pretrained(repo)``.
        fallback: the family defaults (used for anything the processor does not say).
    """
    mean = tuple(float(v) for v in (getattr(processor, "image_mean", None) or fallback.mean))
    std = tuple(float(v) for v in (getattr(processor, "image_std", None) or fallback.std))
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    factor = getattr(processor, "rescale_factor", 1 / 255)
    if getattr(processor, "do_rescale", True) and factor is not None and abs(float(factor) - 1 / 255) > 1e-9:
        log.warning("image processor rescale_factor=%s is not 1/255; the vitdecomp transform uses 1/255", factor)
    resample = getattr(processor, "resample", None)
    code = getattr(resample, "value", resample)
    interpolation = (
        _RESAMPLE.get(int(code), fallback.interpolation) if isinstance(code, int) else fallback.interpolation
    )
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    shortest = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    crop_hw = (_size_field(crop, "height"), _size_field(crop, "width"))
    input_size, crop_pct, mode = fallback.input_size, fallback.crop_pct, fallback.resize_mode
    if crop is not None and crop_hw[0] and crop_hw[1]:
        input_size = (crop_hw[0], crop_hw[1])
        mode = "shortest_crop"
        resized = shortest if shortest else min(height or crop_hw[0], width or crop_hw[1])
        crop_pct = min(input_size) / resized
    elif height and width:
        input_size, crop_pct, mode = (height, width), 1.0, "squash"
    elif shortest:
        input_size, crop_pct, mode = (shortest, shortest), 1.0, "shortest_crop"
        log.warning(
            "image processor resizes the shortest side to %d without a crop; vitdecomp centre-crops a square", shortest
        )
    return Preprocessing(
        input_size=input_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=interpolation,
        crop_pct=float(crop_pct),
        resize_mode=mode,  # type: ignore[arg-type]
        source=f"transformers {type(processor).__name__}",
    )


def _local_dir(rest: str) -> Path | None:
    """The local directory ``rest`` names, None for a hub id; InputError for a missing path."""
    path = Path(rest).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"hf:{rest} is a file; pass the model directory (with config.json), or checkpoint=FILE")
        return path.resolve()
    looks_local = rest.startswith(("/", "./", "../", "~", ".\\")) or rest.count("/") > 1 or "\\" in rest
    if looks_local:
        raise InputError(f"hf:{rest}: no such local directory (a hub id looks like 'org/name')")
    return None


def _model_class(config: Any, spec: str) -> Any:
    """The transformers class to build for a config (by ``model_type`` and ``architectures``)."""
    import transformers

    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type == "clip":
        name = "CLIPForImageClassification" if "CLIPForImageClassification" in archs else "CLIPModel"
    elif model_type == "clip_vision_model":
        name = "CLIPVisionModelWithProjection" if "CLIPVisionModelWithProjection" in archs else "CLIPVisionModel"
    elif model_type == "vit":
        name = "ViTForImageClassification" if "ViTForImageClassification" in archs else "ViTModel"
    elif model_type == "dinov2":
        name = "Dinov2Model"
    elif model_type == "dinov2_with_registers":
        name = "Dinov2WithRegistersModel"
    elif model_type == "siglip":
        name = "SiglipForImageClassification" if "SiglipForImageClassification" in archs else "SiglipModel"
    elif model_type == "siglip_vision_model":
        name = "SiglipVisionModel"
    elif model_type in ("siglip2", "siglip2_vision_model"):
        raise UnsupportedModelError(f"{spec}: model_type {model_type!r}: {_SIGLIP2}")
    else:
        raise UnsupportedModelError(
            f"{spec}: transformers model_type {model_type!r} (architectures {archs}) is not supported; "
            "supported: clip, clip_vision_model, siglip, siglip_vision_model, vit, dinov2, dinov2_with_registers"
        )
    if archs and name not in archs:
        log.info("%s: architectures %s; loading %s (the decomposable part)", spec, archs, name)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise UnsupportedModelError(f"{spec}: transformers {transformers.__version__} has no {name}")
    return cls


def _weights_digest(directory: Path) -> str:
    """sha256 (16 hex) over the weight files of a local model directory."""
    from ..model import file_sha256

    digest = hashlib.sha256()
    files = sorted(
        p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth") and p.is_file()
    )
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()[:16]


def _image_processor(source: str, local: Path | None) -> Any:
    """``AutoImageProcessor.from_pretrained(source)`` when the repository has one, else None."""
    if local is not None and not (local / "preprocessor_config.json").is_file():
        return None
    try:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001  (offline and not cached, or no processor: family defaults)
        log.debug("no image processor for %s (%s: %s); using family defaults", source, type(exc).__name__, exc)
        return None


def load_hf(rest: str, *, pretrained: bool, checkpoint: Path | None = None) -> Model:
    """Build a transformers model from a hub id or a local directory (``vd.load("hf:...")``).

    The class comes from the config (``model_type``, ``architectures``): ``clip`` ->
    ``CLIPModel`` (or ``CLIPForImageClassification``), ``clip_vision_model`` ->
    ``CLIPVisionModelWithProjection`` when the config names it, else ``CLIPVisionModel``;
    ``vit`` -> ``ViTForImageClassification`` when named, else ``ViTModel``; ``dinov2`` ->
    ``Dinov2Model``; ``dinov2_with_registers`` -> ``Dinov2WithRegistersModel``; ``siglip`` ->
    ``SiglipForImageClassification`` when named, else ``SiglipModel``; ``siglip_vision_model``
    -> ``SiglipVisionModel`` (``siglip2*`` raise UnsupportedModelError).

    Args:
        rest: hub repository id (``"openai/clip-vit-base-patch16"``) or local directory.
        pretrained: ``from_pretrained`` (hub cache when offline); False: random init from
            the config alone (a local directory, or a hub config already in the cache).
        checkpoint: a state dict loaded strictly (after random init) instead of the hub weights.

    Returns:
        A :class:`~vitdecomp.core.model.Model`; ``extras["clip"]`` holds a full ``CLIPModel`` or
        ``SiglipModel`` (image and text towers; text side via ``get_text_features``),
        ``extras["image_processor"]`` the repository's image processor when it has one.

    Raises:
        InputError: a local path that does not exist or is not a model directory.
        WeightsUnavailableError: the config or weights are not local and cannot be fetched.
        UnsupportedModelError: a model type this adapter does not read.
    """
    import transformers

    from ..model import Model, WeightsUnavailableError, load_checkpoint, weights_unavailable

    spec = f"hf:{rest}"
    local = _local_dir(rest)
    source = str(local) if local is not None else rest
    if local is not None and not (local / "config.json").is_file():
        raise InputError(f"{spec}: not a transformers model directory (no config.json in {local})")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as exc:
        if local is not None:
            raise InputError(f"{spec}: not a transformers model directory ({type(exc).__name__}: {exc})") from exc
        detail = " ".join(str(exc).split())[:160]
        raise WeightsUnavailableError(
            f"the config of {spec} is not available (not in the local Hugging Face cache; {type(exc).__name__}: "
            f"{detail}). Fix: download it once with network, or save the model with save_pretrained(DIR) and "
            "use 'hf:DIR'."
        ) from exc
    cls = _model_class(config, spec)
    use_hub = pretrained and checkpoint is None
    if use_hub:
        try:
            module = cls.from_pretrained(source)
        except Exception as exc:
            raise weights_unavailable(spec, exc) from exc
        if local is not None:
            weights = f"pretrained:hf/{local.name}@sha256:{_weights_digest(local)}"
        else:
            commit = getattr(module.config, "_commit_hash", None)
            weights = f"pretrained:hf/{rest}" + (f"@{commit}" if commit else "")
    else:
        module = cls(config)
        weights = "random-init"
    if checkpoint is not None:
        weights = load_checkpoint(module, Path(checkpoint))
    module.eval()

    adapter = HFViTAdapter()
    prep = adapter.preprocessing(module)
    processor = _image_processor(source, local)
    if processor is not None:
        prep = preprocessing_from_processor(processor, prep)
    extras: dict[str, Any] = {}
    if type(module).__name__ in ("CLIPModel", "SiglipModel"):
        extras["clip"] = module
    if processor is not None:
        extras["image_processor"] = processor
    log.info("loaded %s as %s (%s)", spec, type(module).__name__, weights)
    return Model(module, name=spec, weights=weights, preprocessing=prep, extras=extras)
