"""The synthetic world: procedural scenes with known factors, exact masks and captions.

* :mod:`vitdecomp.synth.shapes`: factor vocabularies (:data:`SHAPES`, :data:`COLOURS`,
  :data:`PATTERNS`, :data:`SIZES`, :data:`POSITIONS`, :data:`BACKGROUNDS`) and the numpy drawing
  of exact shape masks, patterns and seeded procedural backgrounds.
* :mod:`vitdecomp.synth.generator`: :class:`Scene` / :class:`SceneObject`, :func:`render` (image +
  one exact mask per object), :func:`caption`, :func:`partial_captions`, :func:`describe`,
  :func:`sample_scene`.
* :mod:`vitdecomp.synth.dataset`: :func:`generate_dataset` writes a split ImageFolder dataset with
  masks and ``factors.csv``, and for ``spurious=p`` also a Waterbirds ``metadata.csv`` (the
  background-correlated variant) and ``task.json``; :func:`read_factors`, :func:`read_masks`,
  :func:`read_task` read it back.

Example::

    import numpy as np
    from vitdecomp import synth

    scene = synth.sample_scene(np.random.default_rng(0), fixed={"background": "water"})
    image, masks = synth.render(scene)      # PIL RGB 64x64, [bool [64, 64]] per object
    synth.caption(scene)                    # e.g. 'a large red striped star at the top left on water'
    synth.generate_dataset("wb", 2000, seed=0, task="shape", spurious=0.95)

The names below are re-exported lazily, so ``import vitdecomp.synth`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "shapes": ("SHAPES", "COLOURS", "SHADES", "PATTERNS", "SIZES", "POSITIONS", "BACKGROUNDS", "RADIUS",
               "PAINT_COLOURS"),
    "generator": ("OBJECT_FACTORS", "SCENE_FACTORS", "VOCABULARY", "POSITION_PHRASES", "BACKGROUND_PHRASES",
                  "MAX_OBJECTS", "SceneObject", "Scene", "object_centre", "render", "render_array", "caption",
                  "partial_captions", "describe", "sample_scene"),
    "dataset": ("SPLITS", "SPURIOUS_CLASSES", "SPURIOUS_GROUPS", "PLACES", "generate_dataset", "read_factors",
                "read_masks", "read_task", "task_description"),
    "vitdecomp.core.tiny": ("build_tiny_clip", "build_tiny_vit", "save_tiny", "load_tiny"),
    "train": ("train_clip", "train_classifier", "evaluate_clip", "evaluate_classifier"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        module = _WHERE[name]
        target = module if module.startswith("vitdecomp.") else f"{__name__}.{module}"
        return getattr(importlib.import_module(target), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
