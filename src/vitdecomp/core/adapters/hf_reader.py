"""Reads transformers ViT modules into a :class:`~vitdecomp.core.adapters.base.ViTMap`: :class:`HFViTAdapter`.

One job: given a stock CLIP / SigLIP / ViT / DINOv2 (+registers) module, find its tower, read
every encoder layer into a :class:`~vitdecomp.core.adapters.base.BlockMap` (separate q/k/v/out
projections, DINOv2 LayerScales folded in, the MLP write and neuron inputs), and its readout per
family (docs/method.md §2.4; registers and prefix tokens §2.3) with the stock forward that
gives the representation. The representation of each class is in the table of
:mod:`vitdecomp.core.adapters.hf_vit`; the class and path names read are in
:mod:`~vitdecomp.core.adapters.hf_names`; SigLIP's attention-pooling head is read by
:mod:`~vitdecomp.core.adapters.hf_siglip`; building a model from the hub or a directory is
:mod:`~vitdecomp.core.adapters.hf_loader`.

Eager, SDPA and the other attention implementations all work: the engine recomputes the
pattern rows from the captured ``q``/``k`` projections. ``interpolate_pos_encoding`` is
left as the stock forward has it (DINOv2 always interpolates; CLIP/ViT need the built size).

``transformers`` is imported only inside functions, so ``import vitdecomp`` stays light.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ...errors import InputError, UnsupportedModelError
from ..readout import FrozenNorm, ViTReadout
from .base import AttentionMap, BlockMap, CapturePoint, Preprocessing, ViTMap, register_adapter
from .hf_names import (
    ATTN_LAYOUTS,
    LAYER_CHILDREN,
    LAYER_CLASSES,
    MLP_OUT,
    REFUSED,
    SUPPORTED,
    known_name,
    output_field,
    pair,
    submodule,
)
from .hf_siglip import siglip_attention_pool

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HALF",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "HFViTAdapter",
    "Representation",
]

log = logging.getLogger(__name__)

Representation = Literal["default", "pooler_output"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


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
        return known_name(module, SUPPORTED.keys() | REFUSED.keys()) is not None

    def _tower(self, module: nn.Module) -> _Tower:
        name = known_name(module, SUPPORTED.keys() | REFUSED.keys())
        if name is None:
            raise UnsupportedModelError(f"{type(module).__name__} is not a transformers model this adapter reads")
        if name in REFUSED:
            raise UnsupportedModelError(f"{name}: {REFUSED[name]}")
        family = SUPPORTED[name]
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
            found = submodule(tower.core, rel)
            if isinstance(found, nn.ModuleList) and len(found) > 0:
                prefix = f"{tower.core_path}.{rel}".lstrip(".")
                return [(f"{prefix}.{i}", layer) for i, layer in enumerate(found)]
        raise UnsupportedModelError(
            f"{tower.name}: found no encoder layers (looked for encoder.layers, encoder.layer, layers)"
        )

    def _block(self, name: str, layer: nn.Module, config: Any) -> BlockMap:
        from torch import nn

        if known_name(layer, LAYER_CLASSES) is None:
            raise UnsupportedModelError(
                f"{name}: layer type {type(layer).__name__} is not one of the pre-norm layers vitdecomp reads "
                f"({', '.join(LAYER_CLASSES)})"
            )
        for child, sub in layer.named_children():
            if child not in LAYER_CHILDREN and any(True for _ in sub.parameters()):
                raise UnsupportedModelError(
                    f"{name}.{child}: unexpected module {type(sub).__name__} with parameters inside the layer; "
                    "vitdecomp cannot tell how it enters the residual stream"
                )

        # ---- attention: separate q/k/v Linear modules and an output Linear
        layout = None
        for paths in ATTN_LAYOUTS:
            mods = [submodule(layer, p) for p in paths]
            if all(isinstance(mod, nn.Linear) for mod in mods):
                layout = (paths, mods)
                break
        if layout is None:
            import transformers

            raise UnsupportedModelError(
                f"{name}: no separate q/k/v/output Linear projections at any known path "
                f"({'; '.join(', '.join(p) for p in ATTN_LAYOUTS)}) in transformers {transformers.__version__}"
            )
        paths, (q_lin, k_lin, v_lin, o_lin) = layout  # type: ignore[misc]
        attn_path = paths[0].split(".")[0]
        attn_mod = submodule(layer, attn_path)
        self_attn = submodule(layer, paths[0].rsplit(".", 1)[0])  # the module owning q/k/v
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
        intermediate = submodule(layer, "intermediate")
        if ls2 is not None:
            write = CapturePoint(layer.get_submodule("layer_scale2"), "output", "mlp_write")
        elif intermediate is not None and isinstance(submodule(layer, "output.dense"), nn.Linear):
            write = CapturePoint(layer.get_submodule("output.dense"), "output", "mlp_write")  # ViTOutput adds x itself
        elif submodule(layer, "mlp") is not None:
            write = CapturePoint(layer.get_submodule("mlp"), "output", "mlp_write")
        else:
            raise UnsupportedModelError(f"{name}: found no MLP (looked for `mlp` and `intermediate`/`output.dense`)")

        fc2 = None
        for path in MLP_OUT:
            cand = submodule(layer, path)
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

        mod = submodule(layer, child)
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
                    f"(expected input size {pair(tower.config.image_size)})"
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
                return readout, lambda x: output_field(run(core, x), "pooler_output")
            if tower.name == "CLIPModel":
                return readout, lambda x: output_field(run(m, x), "pooler_output")  # get_image_features
            return readout, lambda x: output_field(run(m, x), "image_embeds")

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
            return ViTReadout(token_norm=norm, pool="cls", pooled_norm=None), lambda x: output_field(
                run(core, x), "last_hidden_state"
            )[:, 0]
        # DINOv2: pooler_output = layernorm(x_L)[:, 0]
        return ViTReadout(token_norm=norm, pool="cls", pooled_norm=None), lambda x: output_field(
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
            return mean, lambda x: output_field(run(core, x), "last_hidden_state").mean(dim=1)
        readout = ViTReadout(
            token_norm=post,
            pool="attention",
            pooled_norm=None,
            pool_start=0,
            attn_pool=siglip_attention_pool(head, f"{cp}head"),
        )
        target = m if tower.name == "SiglipModel" and self.representation == "default" else core
        return readout, lambda x: output_field(run(target, x), "pooler_output")

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
        return readout, lambda x: output_field(run(core, x), "pooler_output")

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
            patch_size=pair(tower.config.patch_size),
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
        size = pair(tower.config.image_size)
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

        name = known_name(module, SUPPORTED.keys())
        head = getattr(module, "classifier", None)
        is_classifier = name in (
            "ViTForImageClassification",
            "CLIPForImageClassification",
            "SiglipForImageClassification",
        )
        if is_classifier and isinstance(head, nn.Linear) and self.representation == "default":
            return head.weight, head.bias
        return None


register_adapter(HFViTAdapter())
