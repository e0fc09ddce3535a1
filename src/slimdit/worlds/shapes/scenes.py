"""Procedural scenes: coloured circles, squares and triangles on black, 32x32, deterministic by seed.

A scene is a list of placed objects. Rendering supersamples each object's coverage and box-filters it down,
so edges are antialiased the same way every time. The detector in ``detector.py`` reads the same geometry
constants, so ground truth and evaluation can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESOLUTION = 32
SUPERSAMPLE = 8
SHAPES = ("circle", "square", "triangle")
# Six fully saturated hues 60 degrees apart: far apart in RGB and separable by hue alone.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (235, 45, 45),
    "yellow": (235, 235, 45),
    "green": (45, 235, 45),
    "cyan": (45, 235, 235),
    "blue": (45, 45, 235),
    "magenta": (235, 45, 235),
}
BACKGROUND = (0, 0, 0)
SIZES: dict[str, float] = {"small": 7.0, "big": 11.0}  # side / diameter in pixels at 32x32
GAP = 2.0  # minimum empty pixels between the boxes of two objects
RELATIONS = ("left of", "right of", "above", "below")
RELATION_MARGIN = 3.0  # centroids must differ by more than this along the relation's axis
GT_RELATION_MARGIN = 6.0  # ground truth keeps a wider margin so that it is never ambiguous


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks of one object; ``None`` means any value."""

    shape: str
    color: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class PlacedObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = SIZES[self.size] / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float = RELATION_MARGIN) -> bool:
    """Whether centroid ``a`` stands in relation ``rel`` to centroid ``b`` (image y grows downwards)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if rel == "left of":
        return dx < -margin
    if rel == "right of":
        return dx > margin
    if rel == "above":
        return dy < -margin
    if rel == "below":
        return dy > margin
    raise ValueError(f"unknown relation {rel!r}; allowed: {RELATIONS}")


def _separated(a: PlacedObject, b: PlacedObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return bx0 - ax1 >= GAP or ax0 - bx1 >= GAP or by0 - ay1 >= GAP or ay0 - by1 >= GAP


def place(specs: list[ObjectSpec], rng: np.random.Generator, relation: str | None = None,
          tries: int = 2000) -> list[PlacedObject]:
    """Fill unspecified attributes at random and place the objects without overlap.

    With ``relation``, object 0 must stand in that relation to object 1 with a wide margin.
    """
    if relation is not None and len(specs) != 2:
        raise ValueError("a relation needs exactly two objects")
    for _ in range(tries):
        objs: list[PlacedObject] = []
        for spec in specs:
            size = spec.size or SIZES_LIST[rng.integers(len(SIZES_LIST))]
            color = spec.color or COLOR_LIST[rng.integers(len(COLOR_LIST))]
            half = SIZES[size] / 2
            lo, hi = half + 1.0, RESOLUTION - half - 1.0
            for _ in range(50):
                cand = PlacedObject(spec.shape, color, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
                if all(_separated(cand, o) for o in objs):
                    objs.append(cand)
                    break
            else:
                break
        if len(objs) != len(specs):
            continue
        if relation is not None:
            a, b = objs
            if not relation_holds(relation, (a.cx, a.cy), (b.cx, b.cy), GT_RELATION_MARGIN):
                continue
        return objs
    raise RuntimeError(f"could not place {specs} with relation {relation!r} in {tries} tries")


SIZES_LIST = tuple(SIZES)
COLOR_LIST = tuple(COLORS)


def coverage(shape: str, cx: float, cy: float, side: float) -> tuple[slice, slice, np.ndarray]:
    """Return the pixel window of a shape and its fractional coverage there, by supersampling."""
    half = side / 2
    px0, py0 = max(int(np.floor(cx - half)), 0), max(int(np.floor(cy - half)), 0)
    px1, py1 = min(int(np.ceil(cx + half)), RESOLUTION), min(int(np.ceil(cy + half)), RESOLUTION)
    px1, py1 = max(px1, px0 + 1), max(py1, py0 + 1)
    s = SUPERSAMPLE
    xs = px0 + (np.arange((px1 - px0) * s) + 0.5) / s
    ys = py0 + (np.arange((py1 - py0) * s) + 0.5) / s
    X, Y = np.meshgrid(xs, ys)
    if shape == "circle":
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(X - cx) <= half) & (np.abs(Y - cy) <= half)
    elif shape == "triangle":  # upright isosceles, apex at the top, base as wide as it is tall
        top = cy - half
        inside = (Y >= top) & (Y <= cy + half) & (np.abs(X - cx) <= (Y - top) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; allowed: {SHAPES}")
    cov = inside.reshape(py1 - py0, s, px1 - px0, s).mean(axis=(1, 3))
    return slice(py0, py1), slice(px0, px1), cov


def render(objs: list[PlacedObject]) -> np.ndarray:
    """Render a scene to a (32, 32, 3) uint8 image."""
    img = np.empty((RESOLUTION, RESOLUTION, 3), dtype=np.float32)
    img[:] = BACKGROUND
    for obj in objs:
        sy, sx, cov = coverage(obj.shape, obj.cx, obj.cy, SIZES[obj.size])
        col = np.asarray(COLORS[obj.color], dtype=np.float32)
        img[sy, sx] = img[sy, sx] * (1 - cov[..., None]) + col * cov[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
