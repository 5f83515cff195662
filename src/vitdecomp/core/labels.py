"""Component labels: what each row of a :class:`~vitdecomp.ComponentStack` is.

A label is a small frozen record with a canonical string form::

    embed          the embedding (patch + position + prefix tokens), start_layer == 0
    rest           everything before ``start_layer`` (embedding and earlier blocks)
    L07            all of block 7                           (after ``group("layer")``)
    L07.attn       all heads of block 7 together            (granularity="layer")
    L07.H03        head 3 of block 7                        (granularity="head")
    L07.bias       the constant terms of block 7's attention (b_O + sum_h W_O^h b_V^h)
    L07.mlp        block 7's MLP output (a non-linear leaf)
    L07.N0123      MLP neuron 123 of block 7                (mlp_neurons=True)
    L07.mlp_bias   the MLP output bias of block 7           (mlp_neurons=True)
    pool_mlp       the MLP of an attention-pooling head (SigLIP MAP), a non-linear leaf
    bias           constants added by the readout (final norm beta, projection bias)
    other          the sum of rows removed by ``select(..., keep_rest=True)``

Hierarchical models (Swin, MaxViT) name blocks by stage and block within the stage,
``S2.B17.H05`` (stages and blocks count from 0: Swin-B's 18-block stage is ``S2``), and keep the global block index in ``layer`` for selection; labels parsed
from such strings carry no ``layer``, so stacks look labels up by their string form.
A token index (``t012``) is appended when a stack is flattened over tokens
(``L07.H03.t012``). Layers count from 0 at the input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = ["ComponentKind", "ComponentLabel", "parse_label", "INPUT_KINDS", "CONSTANT_KINDS", "Kinds", "kind_mask",
           "resolve_kinds"]

ComponentKind = Literal[
    "embed", "rest", "block", "attn", "head", "bias", "mlp", "neuron", "mlp_bias", "conv", "pool_mlp", "const", "other"
]

_KINDS_WITH_LAYER = {"block", "attn", "head", "bias", "mlp", "neuron", "mlp_bias", "conv"}


@dataclass(frozen=True, order=True)
class ComponentLabel:
    """One component of a decomposition.

    Attributes:
        kind: what the component is (see the module docstring).
        layer: block index counted from 0 at the input, for per-block kinds.
        head: attention head index, for ``kind == "head"``.
        neuron: MLP hidden unit index, for ``kind == "neuron"``.
        token: source token index, only in stacks flattened over tokens.
        stage: stage index for hierarchical models (None for isotropic ViTs).
        block: block index within its stage (hierarchical models; shown as ``S2.B17``).
    """

    kind: ComponentKind
    layer: int | None = None
    head: int | None = None
    neuron: int | None = None
    token: int | None = None
    stage: int | None = None
    block: int | None = None

    def __post_init__(self) -> None:
        if self.kind in _KINDS_WITH_LAYER and self.layer is None and self.block is None:
            raise ValueError(f"a {self.kind!r} label needs a layer (or a stage block)")
        if self.kind == "head" and self.head is None:
            raise ValueError("a 'head' label needs a head index")
        if self.kind == "neuron" and self.neuron is None:
            raise ValueError("a 'neuron' label needs a neuron index")

    def with_token(self, token: int | None) -> ComponentLabel:
        """The same label routed through source token ``token``."""
        return replace(self, token=token)

    def __str__(self) -> str:
        if self.kind == "const":
            base = "bias"
        elif self.kind in ("embed", "rest", "other", "pool_mlp"):
            base = self.kind
        else:
            if self.stage is not None and self.block is not None:
                base = f"S{self.stage}.B{self.block:02d}"
            else:
                base = f"L{self.layer:02d}"
            if self.kind == "block":
                pass
            elif self.kind == "head":
                base += f".H{self.head:02d}"
            elif self.kind == "neuron":
                base += f".N{self.neuron:04d}"
            else:
                base += f".{self.kind}"
        if self.token is not None:
            base += f".t{self.token:03d}"
        return base


_LABEL_RE = re.compile(
    r"^(?:S(?P<stage>\d+)\.B(?P<block>\d+)|L(?P<layer>\d+))(?:\.(?:H(?P<head>\d+)|N(?P<neuron>\d+)|(?P<kind>attn|bias|mlp|mlp_bias|conv)))?$"
)


def parse_label(text: str) -> ComponentLabel:
    """Inverse of ``str(label)``.

    >>> str(parse_label("L07.H03.t012"))
    'L07.H03.t012'
    """
    token = None
    match = re.match(r"^(?P<body>.*)\.t(?P<token>\d+)$", text)
    if match:
        text, token = match["body"], int(match["token"])
    if text in ("embed", "rest", "other", "pool_mlp"):
        return ComponentLabel(text, token=token)  # type: ignore[arg-type]
    if text == "bias":
        return ComponentLabel("const", token=token)
    m = _LABEL_RE.match(text)
    if not m:
        raise ValueError(f"not a component label: {text!r}")
    where: dict[str, Any] = {"token": token}
    if m["stage"] is not None:
        where.update(stage=int(m["stage"]), block=int(m["block"]))
    layer = int(m["layer"]) if m["layer"] is not None else None
    if m["head"] is not None:
        return ComponentLabel("head", layer, head=int(m["head"]), **where)
    if m["neuron"] is not None:
        return ComponentLabel("neuron", layer, neuron=int(m["neuron"]), **where)
    return ComponentLabel(m["kind"] or "block", layer, **where)


#: Components that compute something from the input: attention heads (and their block / attn
#: sums), MLPs and their neurons, conv leaves (MaxViT MBConv), an attention pool's MLP. The
#: default set every ranking, retrieval, heat-map choice and debias selection considers.
INPUT_KINDS: tuple[str, ...] = ("head", "attn", "block", "mlp", "neuron", "conv", "pool_mlp")
#: Rows that carry no learned, input-specific computation: the embedding / everything before
#: ``start_layer`` (``embed``, ``rest``), bias rows (they vary across images only through frozen
#: norm statistics), the readout constant, and a ``select(..., keep_rest=True)`` remainder.
CONSTANT_KINDS: tuple[str, ...] = ("embed", "rest", "bias", "mlp_bias", "const", "other")

#: ``"input"`` (:data:`INPUT_KINDS`, the default), ``"all"``, or explicit kind names.
Kinds = Any


def resolve_kinds(kinds: Kinds = "input") -> frozenset[str]:
    """The set of label kinds a ``kinds=`` argument (or ``--kinds`` flag) names.

    ``"input"`` is :data:`INPUT_KINDS`; ``"all"`` every kind; otherwise kind names, as a
    sequence or one comma-separated string (``"head,mlp,embed"``); ``"input+embed"`` adds to
    the default.

    Raises:
        ValueError: an unknown kind name.
    """
    known = set(INPUT_KINDS) | set(CONSTANT_KINDS)
    if kinds is None or kinds == "input":
        return frozenset(INPUT_KINDS)
    if kinds == "all":
        return frozenset(known)
    names = kinds.replace("+", ",").split(",") if isinstance(kinds, str) else list(kinds)
    out: set[str] = set()
    for name in (str(n).strip() for n in names):
        if not name:
            continue
        if name == "input":
            out |= set(INPUT_KINDS)
        elif name == "all":
            out |= known
        elif name in known:
            out.add(name)
        else:
            raise ValueError(f"unknown component kind {name!r}; use 'input', 'all' or names from {sorted(known)}")
    if not out:
        raise ValueError("kinds names no component kind")
    return frozenset(out)


def kind_mask(labels: Any, kinds: Kinds = "input") -> Any:
    """bool ``[comp]`` numpy mask: which ``labels`` (label objects or strings) are of ``kinds``."""
    import numpy as np

    wanted = resolve_kinds(kinds)
    out = []
    for lab in labels:
        if not isinstance(lab, ComponentLabel):
            try:
                lab = parse_label(str(lab))
            except ValueError:
                out.append(False)
                continue
        out.append(lab.kind in wanted)
    return np.array(out, dtype=bool)
