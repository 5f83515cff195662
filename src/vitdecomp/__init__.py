"""vitdecomp: exact component decompositions of vision transformers, explained in words.

The public API (imported lazily, so ``import vitdecomp`` and ``vitdecomp --help`` stay fast)::

    import vitdecomp as vd
    model = vd.load("timm:deit_small_patch16_224")        # or vd.wrap(stock_module)
    stack = vd.decompose(model, pixels, granularity="head")
    stack.error()                                           # <= 1e-5 in fp32, checked
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "vitdecomp.loading",
    "wrap": "vitdecomp.model",
    "Model": "vitdecomp.model",
    "WeightsUnavailableError": "vitdecomp.model",
    "decompose": "vitdecomp.decomposition",
    "decompose_dataset": "vitdecomp.dataset_run",
    "DatasetRun": "vitdecomp.dataset_run",
    "iter_decompose": "vitdecomp.decomposition",
    "ComponentStack": "vitdecomp.stack",
    "TokenInfo": "vitdecomp.stack",
    "ComponentLabel": "vitdecomp.labels",
    "parse_label": "vitdecomp.labels",
    "VitDecompError": "vitdecomp.errors",
    "UnsupportedModelError": "vitdecomp.errors",
    "DecompositionError": "vitdecomp.errors",
    "InputError": "vitdecomp.errors",
    "registered_adapters": "vitdecomp.adapters.base",
    "register_adapter": "vitdecomp.adapters.base",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .adapters.base import register_adapter, registered_adapters
    from .dataset_run import DatasetRun, decompose_dataset
    from .decomposition import decompose, iter_decompose
    from .errors import DecompositionError, InputError, UnsupportedModelError, VitDecompError
    from .labels import ComponentLabel, parse_label
    from .loading import load
    from .model import Model, WeightsUnavailableError, wrap
    from .stack import ComponentStack, TokenInfo


_SUBMODULES = ("data", "store", "testing", "synth", "text", "textspan", "score", "heatmap", "attention_maps",
               "segmentation", "report", "demo", "align", "ablate", "retrieve")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # vd.data, vd.text, ...: imported on first use
        return import_module(f"vitdecomp.{name}")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitdecomp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
