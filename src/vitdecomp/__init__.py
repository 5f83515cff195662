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

from . import compat

__version__ = "0.1.0"

_EXPORTS = {
    "load": "vitdecomp.core.loading",
    "wrap": "vitdecomp.core.model",
    "Model": "vitdecomp.core.model",
    "WeightsUnavailableError": "vitdecomp.core.model",
    "decompose": "vitdecomp.core.decomposition",
    "decompose_dataset": "vitdecomp.store.dataset_run",
    "DatasetRun": "vitdecomp.store.dataset_run",
    "iter_decompose": "vitdecomp.core.decomposition",
    "ComponentStack": "vitdecomp.core.stack",
    "TokenInfo": "vitdecomp.core.stack",
    "ComponentLabel": "vitdecomp.core.labels",
    "parse_label": "vitdecomp.core.labels",
    "VitDecompError": "vitdecomp.errors",
    "UnsupportedModelError": "vitdecomp.errors",
    "DecompositionError": "vitdecomp.errors",
    "InputError": "vitdecomp.errors",
    "registered_adapters": "vitdecomp.core.adapters.base",
    "register_adapter": "vitdecomp.core.adapters.base",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:
    from .core.adapters.base import register_adapter, registered_adapters
    from .store.dataset_run import DatasetRun, decompose_dataset
    from .core.decomposition import decompose, iter_decompose
    from .errors import DecompositionError, InputError, UnsupportedModelError, VitDecompError
    from .core.labels import ComponentLabel, parse_label
    from .core.loading import load
    from .core.model import Model, WeightsUnavailableError, wrap
    from .core.stack import ComponentStack, TokenInfo


#: ``vd.<name>`` submodules, imported on first use (the documented library parts)
_SUBMODULES = {
    "core": "vitdecomp.core",
    "data": "vitdecomp.data",
    "store": "vitdecomp.store",
    "interpret": "vitdecomp.interpret",
    "apps": "vitdecomp.apps",
    "report": "vitdecomp.report",
    "synth": "vitdecomp.synth",
    "testing": "vitdecomp.testing",
    "text": "vitdecomp.interpret.text",
    "align": "vitdecomp.interpret.align",
    "textspan": "vitdecomp.interpret.textspan",
    "score": "vitdecomp.interpret.score",
    "ablate": "vitdecomp.interpret.ablate",
    "retrieve": "vitdecomp.apps.retrieve",
    "heatmap": "vitdecomp.apps.heatmap",
    "debias": "vitdecomp.apps.debias",
    "segmentation": "vitdecomp.apps.segmentation",
    "attention_maps": "vitdecomp.apps.segmentation.attention",
    "demo": "vitdecomp.synth.demo",
}

compat.install()  # old module paths (vitdecomp.stack, vitdecomp.text, ...) keep importing, with a warning


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # vd.data, vd.text, ...: imported on first use
        return import_module(_SUBMODULES[name])
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vitdecomp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
