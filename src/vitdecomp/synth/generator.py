"""Scenes of the synthetic world: what is in an image, how it is drawn, and how it is described.

A :class:`Scene` is one or two :class:`SceneObject` s (shape, colour, pattern, size, position) on a
background kind, plus a seed. :func:`render` draws it deterministically (the seed fixes the
background texture and each object's small offset inside its cell; the same scene always gives
the same bytes) and returns an exact mask per object. :func:`caption` describes it in a small
vocabulary, fully or by a subset of attributes. :func:`sample_scene` draws a random scene from a
numpy ``Generator``. Writing whole datasets is :func:`vitdecomp.synth.dataset.generate_dataset`.

Example::

    rng = np.random.default_rng(0)
    scene = sample_scene(rng, fixed={"colour": "red", "background": "water"})
    image, masks = render(scene)           # PIL RGB 64x64, [bool [64, 64]] per object
    caption(scene)                         # e.g. 'a small red striped triangle at the top left on water'
    caption(scene, ("colour",))            # 'a red object'
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError
from .shapes import (
    BACKGROUNDS,
    COLOURS,
    PATTERNS,
    POSITIONS,
    RADIUS,
    SHADES,
    SHAPES,
    SIZES,
    pattern_mask,
    position_centre,
    render_background,
    shape_extent,
    shape_mask,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "OBJECT_FACTORS", "SCENE_FACTORS", "VOCABULARY", "POSITION_PHRASES", "BACKGROUND_PHRASES", "MAX_OBJECTS",
    "SceneObject", "Scene", "object_centre", "render", "render_array", "caption", "partial_captions", "describe",
    "sample_scene", "factor_phrases",
]

#: Factors of one object, in caption order.
OBJECT_FACTORS: tuple[str, ...] = ("shape", "colour", "pattern", "size", "position")
#: Every factor of a scene: the object factors (of the main object) plus the background kind.
SCENE_FACTORS: tuple[str, ...] = (*OBJECT_FACTORS, "background")
#: Values of each factor.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": SIZES,
    "position": POSITIONS, "background": BACKGROUNDS,
}
#: How a caption says where an object is.
POSITION_PHRASES: dict[str, str] = {
    "top-left": "at the top left", "top": "at the top", "top-right": "at the top right",
    "left": "on the left", "centre": "in the centre", "right": "on the right",
    "bottom-left": "at the bottom left", "bottom": "at the bottom", "bottom-right": "at the bottom right",
}
#: How a caption names the background.
BACKGROUND_PHRASES: dict[str, str] = {
    "water": "on water", "land": "on land", "sand": "on sand", "sky": "in the sky",
    "plain": "on a plain background",
}
#: Most objects a scene may hold (one per grid cell).
MAX_OBJECTS = len(POSITIONS)
_ALIASES = {"color": "colour", "texture": "pattern", "place": "background", "bg": "background"}
#: Largest random offset of an object's centre from its cell centre, as a fraction of the image side.
_JITTER = 0.05


def canonical_factor(name: str) -> str:
    """Canonical factor name (accepts "color", "texture"); raises InputError for an unknown one."""
    canonical = _ALIASES.get(name, name)
    if canonical not in VOCABULARY:
        raise InputError(f"unknown factor {name!r}; use one of {', '.join(SCENE_FACTORS)}")
    return canonical


def check_value(factor: str, value: str) -> None:
    if value not in VOCABULARY[factor]:
        raise InputError(f"unknown {factor} {value!r}; use one of {', '.join(VOCABULARY[factor])}")


@dataclass(frozen=True)
class SceneObject:
    """The factors of one object (every value from :data:`VOCABULARY`)."""

    shape: str
    colour: str
    pattern: str = "solid"
    size: str = "large"
    position: str = "centre"

    def __post_init__(self) -> None:
        for factor in OBJECT_FACTORS:
            check_value(factor, getattr(self, factor))

    def factors(self) -> dict[str, str]:
        """``{factor: value}`` in :data:`OBJECT_FACTORS` order."""
        return {f: getattr(self, f) for f in OBJECT_FACTORS}


@dataclass(frozen=True)
class Scene:
    """One image of the synthetic world.

    ``objects`` are painted in order (a later object hides an earlier one where they overlap);
    ``objects[0]`` is the *main* object, the one a dataset's label and a partial caption refer to.
    ``seed`` (a non-negative int) fixes the background texture and the objects' offsets inside
    their cells, independently of the factors: two scenes that differ in one factor and share the
    seed differ in the image only where that factor shows.
    """

    objects: tuple[SceneObject, ...]
    background: str = "plain"
    seed: int = 0

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise InputError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(objects)}")
        if not all(isinstance(o, SceneObject) for o in objects):
            raise InputError("Scene.objects must be SceneObject instances")
        check_value("background", self.background)
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError(f"Scene.seed must be a non-negative int, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def main(self) -> SceneObject:
        """The main object, ``objects[0]``."""
        return self.objects[0]

    def factors(self) -> dict[str, Any]:
        """Flat factors: ``background``, ``seed``, ``n_objects`` and ``obj{k}_{factor}`` for every object."""
        out: dict[str, Any] = {"background": self.background, "seed": self.seed, "n_objects": len(self.objects)}
        for k, obj in enumerate(self.objects):
            out.update({f"obj{k}_{f}": v for f, v in obj.factors().items()})
        return out

    @classmethod
    def from_factors(cls, row: Mapping[str, Any]) -> Scene:
        """Inverse of :meth:`factors` (also reads a ``factors.csv`` row; empty cells mean no object)."""
        objects = []
        for k in range(MAX_OBJECTS):
            values = {f: row.get(f"obj{k}_{f}") for f in OBJECT_FACTORS}
            if not values["shape"]:
                break
            objects.append(SceneObject(**{f: str(v) for f, v in values.items()}))
        return cls(tuple(objects), str(row["background"]), int(row["seed"]))


def _object_rng(seed: int, k: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1 + k])


def object_centre(scene: Scene, k: int, size: int = 64) -> tuple[float, float]:
    """Centre ``(x, y)`` px of object ``k``: its cell centre plus a seeded offset, clamped inside the image."""
    obj = scene.objects[k]
    cx, cy = position_centre(obj.position, size)
    dx, dy = _object_rng(scene.seed, k).uniform(-_JITTER, _JITTER, 2) * size
    margin = shape_extent(obj.shape, RADIUS[obj.size] * size) + 1.0
    return float(np.clip(cx + dx, margin, size - margin)), float(np.clip(cy + dy, margin, size - margin))


def render_array(scene: Scene, size: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw ``scene``: (uint8 RGB ``[size, size, 3]``, one bool ``[size, size]`` mask per object).

    The background comes from ``default_rng([seed, 0])``. Each object is then painted through its
    exact shape mask: base colour (:data:`~vitdecomp.synth.shapes.COLOURS`), and its shade
    (:data:`~vitdecomp.synth.shapes.SHADES`) where the pattern says. Mask ``k`` is the set of pixels
    object ``k`` painted that no later object painted over, so masks are disjoint and a pixel has
    a painted colour exactly when it lies in some mask.
    """
    if size < 16:
        raise InputError(f"render size must be at least 16 px, got {size}")
    image = render_background(scene.background, np.random.default_rng([scene.seed, 0]), size)
    masks: list[np.ndarray] = []
    for k, obj in enumerate(scene.objects):
        cx, cy = object_centre(scene, k, size)
        mask = shape_mask(obj.shape, cx, cy, RADIUS[obj.size] * size, size)
        shade = pattern_mask(obj.pattern, cx, cy, size)
        image[mask & ~shade] = COLOURS[obj.colour]
        image[mask & shade] = SHADES[obj.colour]
        for earlier in masks:
            earlier &= ~mask
        masks.append(mask)
    return image, masks


def render(scene: Scene, size: int = 64) -> tuple[Image.Image, list[np.ndarray]]:
    """Draw ``scene`` as a ``size`` x ``size`` PIL RGB image plus one exact bool ``[size, size]`` mask per object.

    See :func:`render_array` for what is drawn and what the masks hold.
    """
    from PIL import Image

    array, masks = render_array(scene, size)
    return Image.fromarray(array), masks


# ----------------------------------------------------------------------------- captions
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _object_phrase(obj: SceneObject, attributes: Iterable[str]) -> str:
    keep = set(attributes)
    words = [getattr(obj, f) for f in ("size", "colour", "pattern") if f in keep]
    words.append(obj.shape if "shape" in keep else "object")
    phrase = _article(" ".join(words))
    if "position" in keep:
        phrase += " " + POSITION_PHRASES[obj.position]
    return phrase


def caption(scene: Scene, attributes: Sequence[str] | None = None) -> str:
    """Describe ``scene`` in words.

    With ``attributes=None``: every factor of every object, then the background, e.g.
    ``"a small red striped triangle at the top left on water"`` or, for two objects,
    ``"a small red solid circle at the top left and a large blue dotted star in the centre on sand"``.
    With a subset of :data:`SCENE_FACTORS` (``"color"``/``"texture"`` accepted): only those
    attributes of the main object, e.g. ``("colour",)`` -> ``"a red object"``,
    ``("shape", "background")`` -> ``"a triangle on water"``, ``()`` -> ``"an object"``.
    """
    if attributes is None:
        text = " and ".join(_object_phrase(o, OBJECT_FACTORS) for o in scene.objects)
        return f"{text} {BACKGROUND_PHRASES[scene.background]}"
    if isinstance(attributes, str):
        attributes = (attributes,)
    keep = {canonical_factor(a) for a in attributes}
    text = _object_phrase(scene.main, keep)
    if "background" in keep:
        text += " " + BACKGROUND_PHRASES[scene.background]
    return text


def describe(factor: str, value: str) -> str:
    """The one-attribute caption of ``value`` of ``factor``: ``("colour", "red")`` -> ``"a red object"``.

    Useful as the text of a factor value (zero-shot labels, feature retrieval queries).
    """
    factor = canonical_factor(factor)
    check_value(factor, value)
    base = SceneObject("circle", "red")
    if factor == "background":
        return caption(Scene((base,), value), ("background",))
    obj = SceneObject(**{**base.factors(), factor: value})
    return caption(Scene((obj,)), (factor,))


def factor_phrases(factors: Sequence[str] = SCENE_FACTORS) -> dict[str, list[str]]:
    """Per factor, the :func:`describe` phrase of each of its values (``VOCABULARY`` order):
    ``{"colour": ["a red object", ...], ...}``, the synthetic world's feature texts (``--features synth``)."""
    return {f: [describe(f, v) for v in VOCABULARY[canonical_factor(f)]] for f in factors}


def partial_captions(scene: Scene, rng: np.random.Generator, n: int = 3, max_attributes: int = 2) -> list[str]:
    """``n`` distinct partial captions of the main object, each naming 1..``max_attributes`` attributes.

    Attribute subsets are drawn from ``rng`` without repetition (fewer than ``n`` captions when
    there are not that many subsets), e.g. ``["a red object", "a triangle on water", "a large object"]``.
    """
    if n < 0 or max_attributes < 1:
        raise InputError("partial_captions needs n >= 0 and max_attributes >= 1")
    subsets = [c for k in range(1, min(max_attributes, len(SCENE_FACTORS)) + 1)
               for c in itertools.combinations(SCENE_FACTORS, k)]
    chosen = rng.choice(len(subsets), size=min(n, len(subsets)), replace=False)
    return [caption(scene, subsets[int(i)]) for i in chosen]


# ----------------------------------------------------------------------------- sampling
def pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def sample_scene(
    rng: np.random.Generator | int, *, n_objects: int | Sequence[int] = 1, fixed: Mapping[str, str] | None = None,
    shared: Iterable[str] = (),
) -> Scene:
    """Draw a random scene; the same generator state always gives the same scene.

    Args:
        rng: numpy ``Generator`` (advanced by the call) or an int seed.
        n_objects: number of objects, or a sequence of counts to choose from uniformly.
        fixed: ``{factor: value}`` held fixed; object factors apply to the main object
            (``objects[0]``), ``"background"`` to the scene.
        shared: object factors every other object copies from the main object (not "position":
            objects always occupy distinct cells).

    Every other factor is uniform over its vocabulary; the scene's seed is drawn last from ``rng``.
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    fixed = {canonical_factor(k): v for k, v in (fixed or {}).items()}
    for factor, value in fixed.items():
        check_value(factor, value)
    shared = tuple(canonical_factor(f) for f in shared)
    if "position" in shared or "background" in shared:
        raise InputError("shared takes object factors other than position (objects occupy distinct cells)")
    counts = [n_objects] if isinstance(n_objects, (int, np.integer)) else list(n_objects)
    if not counts or any(not 1 <= int(c) <= MAX_OBJECTS for c in counts):
        raise InputError(f"n_objects must be between 1 and {MAX_OBJECTS}, got {n_objects!r}")
    count = int(counts[int(rng.integers(len(counts)))])
    main = {f: fixed.get(f) or pick(rng, VOCABULARY[f]) for f in OBJECT_FACTORS}
    background = fixed.get("background") or pick(rng, BACKGROUNDS)
    objects = [SceneObject(**main)]
    free = [p for p in POSITIONS if p != main["position"]]
    for _ in range(count - 1):
        values = {f: main[f] if f in shared else pick(rng, VOCABULARY[f]) for f in OBJECT_FACTORS if f != "position"}
        position = free.pop(int(rng.integers(len(free))))
        objects.append(SceneObject(**values, position=position))
    return Scene(tuple(objects), background, int(rng.integers(2**31)))


def caption_pool(n: int = 600, seed: int = 99) -> Any:
    """A :class:`~vitdecomp.interpret.text.pools.TextPool` of ``n`` random captions of the world
    (scene ``i`` from ``default_rng([seed, i])``, duplicates dropped): the null pool of random texts
    of the same kind for scores on the synthetic world (:mod:`vitdecomp.interpret.score.nulls`)."""
    from ..interpret.text.pools import TextPool

    texts = list(dict.fromkeys(caption(sample_scene(np.random.default_rng([seed, i]))) for i in range(n)))
    return TextPool("synth/captions", None, texts, f"{len(texts)} random captions of the synthetic world "
                    f"(seed {seed})", f"vitdecomp.synth.generator.caption_pool(n={n}, seed={seed})")
