"""Drawing for the synthetic world: the factor vocabularies, exact shape masks, patterns, backgrounds.

Everything here works on a square pixel grid of side ``size`` with numpy only (no anti-aliasing),
so a shape's mask is exactly the set of pixels it paints. Pixel ``(row y, column x)`` is sampled at
its centre ``(x + 0.5, y + 0.5)``; lengths and centres are in pixels.

Painted colours are reserved: :func:`render_background` never produces a pixel equal to any of
:data:`PAINT_COLOURS` (an object's base colour or its pattern shade), so in a rendered image the
pixels with a painted colour are exactly the union of the object masks.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "SHAPES", "COLOURS", "PATTERNS", "SIZES", "POSITIONS", "BACKGROUNDS", "SHADES", "PAINT_COLOURS",
    "RADIUS", "shape_mask", "shape_extent", "pattern_mask", "position_centre", "render_background",
    "value_noise",
]

#: Shapes an object can have.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
#: Object colours, name -> RGB (0..255); pairwise RGB distance >= 90.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
}
#: Surface patterns: "solid" paints the base colour only; the others mix in the colour's shade.
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
#: Object sizes.
SIZES: tuple[str, ...] = ("small", "large")
#: The 3x3 grid of cells an object's centre lies in, row-major from the top left.
POSITIONS: tuple[str, ...] = ("top-left", "top", "top-right", "left", "centre", "right",
                              "bottom-left", "bottom", "bottom-right")
#: Background kinds ("water" and "land" are the two places of the Waterbirds analogue).
BACKGROUNDS: tuple[str, ...] = ("water", "land", "sand", "sky", "plain")
#: Nominal radius of each size as a fraction of the image side (a circle of this radius; other
#: shapes are scaled to look about as big).
RADIUS: dict[str, float] = {"small": 0.1, "large": 0.2}


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(round(c * 0.45)) for c in rgb)  # type: ignore[return-value]


#: Pattern shade of each colour (the second colour of striped/dotted/checkered surfaces).
SHADES: dict[str, tuple[int, int, int]] = {name: _shade(rgb) for name, rgb in COLOURS.items()}
#: Every colour an object can paint; backgrounds never contain them.
PAINT_COLOURS: tuple[tuple[int, int, int], ...] = tuple(sorted(set(COLOURS.values()) | set(SHADES.values())))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each float64 ``[size, size]``."""
    c = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def _polygon_mask(vx: np.ndarray, vy: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of the points ``(px, py)`` against vertices ``(vx, vy)``."""
    inside = np.zeros(px.shape, dtype=bool)
    j = len(vx) - 1
    for i in range(len(vx)):
        crosses = (vy[i] > py) != (vy[j] > py)
        dy = vy[j] - vy[i]
        if dy != 0:
            x_at = vx[i] + (vx[j] - vx[i]) * (py - vy[i]) / dy
            inside ^= crosses & (px < x_at)
        j = i
    return inside


def _star_vertices(cx: float, cy: float, r: float, points: int = 5, inner: float = 0.45) -> tuple[
        np.ndarray, np.ndarray]:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, r, r * inner)
    return cx + radii * np.cos(angles), cy + radii * np.sin(angles)


#: Per shape: (scale of the nominal radius, half-extent of the shape in units of its scaled radius).
_SHAPE_SCALE: dict[str, tuple[float, float]] = {
    "circle": (1.0, 1.0),
    "square": (0.85, 1.0),  # half side
    "triangle": (1.2, 1.0),  # circumradius; the centroid is the centre
    "star": (1.2, 1.0),  # outer radius
    "cross": (1.0, 1.0),  # arm half length (arm half width 0.33)
}


def shape_extent(shape: str, radius: float) -> float:
    """Largest distance (px) from the centre to the shape's edge along x or y, for clamping into the image."""
    scale, extent = _SHAPE_SCALE[shape]
    return scale * extent * radius


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Exact mask of ``shape`` centred at ``(cx, cy)`` px with nominal ``radius`` px: bool ``[size, size]``.

    A pixel belongs to the shape when its centre lies inside the geometric figure (closed for
    circle/square/cross). The triangle is equilateral, apex up, centred on its centroid; the star
    has five points, apex up.
    """
    px, py = _grid(size)
    dx, dy = px - cx, py - cy
    r = _SHAPE_SCALE[shape][0] * radius
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    if shape == "triangle":
        angles = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3
        return _polygon_mask(cx + r * np.cos(angles), cy + r * np.sin(angles), px, py)
    if shape == "star":
        return _polygon_mask(*_star_vertices(cx, cy, r), px, py)
    raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")


def pattern_mask(pattern: str, cx: float, cy: float, size: int) -> np.ndarray:
    """Where ``pattern`` paints the shade instead of the base colour: bool ``[size, size]``.

    The pattern is attached to the object (its phase follows the rounded centre ``(cx, cy)``);
    periods scale with ``size`` (at 64 px: diagonal stripes of period 6, 2x2 dots every 5 px,
    4x4 checks). "solid" is all False.
    """
    s = max(1.0, size / 64.0)
    rows, cols = np.indices((size, size))
    u, v = cols - int(round(cx)), rows - int(round(cy))
    if pattern == "solid":
        return np.zeros((size, size), dtype=bool)
    if pattern == "striped":
        return ((u + v) // max(2, round(3 * s))) % 2 == 1
    if pattern == "dotted":
        period, dot = max(4, round(5 * s)), max(1, round(2 * s))
        return ((u - 1) % period < dot) & ((v - 1) % period < dot)
    if pattern == "checkered":
        cell = max(2, round(4 * s))
        return ((u // cell) + (v // cell)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}; use one of {', '.join(PATTERNS)}")


def position_centre(position: str, size: int) -> tuple[float, float]:
    """Centre ``(x, y)`` px of the 3x3 grid cell ``position`` in an image of side ``size``."""
    k = POSITIONS.index(position)
    row, col = divmod(k, 3)
    return (col + 0.5) * size / 3.0, (row + 0.5) * size / 3.0


# ----------------------------------------------------------------------------- backgrounds
def value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field in [0, 1]: float64 ``[size, size]``, ``cells`` lattice cells per side.

    Uniform random values on a ``(cells + 1)^2`` lattice, interpolated bilinearly with a smoothstep
    weight, so features are about ``size / cells`` px across.
    """
    lattice = rng.random((cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(np.floor(t).astype(int), cells - 1)
    f = t - i0
    f = f * f * (3.0 - 2.0 * f)
    fy, fx = f[:, None], f[None, :]
    a = lattice[i0[:, None], i0[None, :]]
    b = lattice[i0[:, None], i0[None, :] + 1]
    c = lattice[i0[:, None] + 1, i0[None, :]]
    d = lattice[i0[:, None] + 1, i0[None, :] + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _lerp(c0: tuple[float, ...], c1: tuple[float, ...], t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two RGB colours: ``t`` ``[H, W]`` in [0, 1] -> float64 ``[H, W, 3]``."""
    a, b = np.asarray(c0, dtype=np.float64), np.asarray(c1, dtype=np.float64)
    return a + (b - a) * np.clip(t, 0.0, 1.0)[..., None]


def _waves(rng: np.random.Generator, size: int, cycles: tuple[float, float], tilt: float) -> np.ndarray:
    """One sinusoid in [-1, 1]: random frequency (``cycles`` per image), direction within ``tilt`` rad of vertical."""
    px, py = _grid(size)
    theta = math.pi / 2 + rng.uniform(-tilt, tilt)
    freq = rng.uniform(*cycles) / size
    phase = rng.uniform(0.0, 2 * math.pi)
    return np.sin(2 * math.pi * freq * (px * math.cos(theta) + py * math.sin(theta)) + phase)


def _water(rng: np.random.Generator, size: int) -> np.ndarray:
    w1 = _waves(rng, size, (3.0, 6.0), 0.35)
    w2 = _waves(rng, size, (7.0, 11.0), 0.6)
    n = value_noise(rng, size, 4)
    t = 0.45 + 0.22 * w1 + 0.12 * w2 + 0.35 * (n - 0.5)
    img = _lerp((15, 60, 125), (95, 165, 215), t)
    return img + rng.normal(0.0, 4.0, (size, size, 1))


def _land(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = value_noise(rng, size, 4)
    fine = value_noise(rng, size, 10)
    img = _lerp((60, 120, 40), (120, 88, 48), (coarse - 0.5) * 3.0 + 0.5)
    img *= (0.75 + 0.45 * fine)[..., None]
    return img + rng.normal(0.0, 6.0, (size, size, 3))


def _sand(rng: np.random.Generator, size: int) -> np.ndarray:
    ripples = _waves(rng, size, (8.0, 12.0), 0.5)
    tint = value_noise(rng, size, 3)
    img = _lerp((200, 172, 120), (230, 210, 160), 0.5 + 0.25 * ripples + 0.4 * (tint - 0.5))
    return img + rng.normal(0.0, 7.0, (size, size, 1))


def _sky(rng: np.random.Generator, size: int) -> np.ndarray:
    _, py = _grid(size)
    img = _lerp((70, 130, 215), (165, 200, 240), py / size)
    clouds = np.clip((value_noise(rng, size, 3) - 0.5) * 4.0, 0.0, 1.0) * rng.uniform(0.6, 1.0)
    img = img + (np.asarray((238.0, 240.0, 246.0)) - img) * clouds[..., None]
    return img + rng.normal(0.0, 2.0, (size, size, 1))


def _plain(rng: np.random.Generator, size: int) -> np.ndarray:
    level = rng.uniform(105.0, 150.0)
    return np.full((size, size, 3), level) + rng.normal(0.0, 3.0, (size, size, 1))


_BACKGROUND_RENDERERS = {"water": _water, "land": _land, "sand": _sand, "sky": _sky, "plain": _plain}


def render_background(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Procedural background ``kind`` from ``rng``: uint8 ``[size, size, 3]`` RGB, free of painted colours.

    water: blue, two sinusoidal wave trains plus low-frequency noise; land: green/brown blotches
    (low-frequency value noise) with fine darkening and grain; sand: beige ripples and grain;
    sky: a vertical blue gradient with soft white clouds; plain: a flat grey with slight noise.
    Any pixel that happens to equal one of :data:`PAINT_COLOURS` has its red channel's lowest bit
    flipped (a change of 1/255).
    """
    try:
        draw = _BACKGROUND_RENDERERS[kind]
    except KeyError:
        raise ValueError(f"unknown background {kind!r}; use one of {', '.join(BACKGROUNDS)}") from None
    img = np.clip(np.rint(draw(rng, size)), 0, 255).astype(np.uint8)
    packed_palette = np.asarray([(r << 16) | (g << 8) | b for r, g, b in PAINT_COLOURS], dtype=np.int64)
    for _ in range(2):  # no two painted colours differ in the red channel's lowest bit alone
        packed = (img[..., 0].astype(np.int64) << 16) | (img[..., 1].astype(np.int64) << 8) | img[..., 2]
        clash = np.isin(packed, packed_palette)
        if not clash.any():
            break
        img[clash, 0] ^= 1
    return img
