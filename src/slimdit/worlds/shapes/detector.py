"""The shapes-geneval detector: find the objects in an image and decide whether its prompt holds.

Pixels are foreground when bright and saturated; their colour is the palette hue nearest to theirs, which is
robust to the darkening of antialiased edges. Objects are 8-connected components of one colour; the shape
is the ideal circle, square or upright triangle that, placed and sized by the blob's soft moments and rendered
exactly as scenes are, overlaps it best (soft IoU); the size is that fit's side; positions compare the fitted
centres, as the ground truth places them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from slimdit.worlds.shapes.prompts import Prompt
from slimdit.worlds.shapes.scenes import COLORS, SIZES, coverage, relation_holds

MIN_VALUE = 0.45  # max channel / 255 below this is background
MIN_SATURATION = 0.4
MIN_AREA = 8  # pixels; smaller blobs are noise, the smallest true object has about 24
MIN_SHAPE_IOU = 0.6  # soft IoU with the best-fitting ideal shape; below it the blob is "unknown"
_PAD = 16
_FULL_VALUE = 235 / 255  # brightest channel of every palette colour
SIZE_SPLIT = (SIZES["small"] + SIZES["big"]) / 2
_HUES = {name: _h for name, _h in zip(COLORS, (0.0, 60.0, 120.0, 180.0, 240.0, 300.0), strict=True)}
_STRUCTURE = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    shape: str  # circle | square | triangle | unknown
    color: str
    size: str
    cx: float
    cy: float
    area: int
    iou: float  # soft IoU with the fitted ideal shape


def _hue(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = img.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.select([mx == r, mx == g], [((g - b) / d) % 6, (b - r) / d + 2], (r - g) / d + 4) * 60.0
    return hue, sat, mx


# For a uniform shape of side s: horizontal variance = s**2 / k, and its centroid sits d * s below its centre.
_VAR_X = {"circle": 16.0, "square": 12.0, "triangle": 24.0}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6}


def _fit(cov: np.ndarray) -> tuple[str, float, float, float, float]:
    """Fit each ideal shape to a soft coverage map by its moments; return the best (shape, iou, cx, cy, side)."""
    h, w = cov.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    mass = cov.sum()
    mx, my = (cov * xs).sum() / mass, (cov * ys).sum() / mass
    var_x = (cov * (xs - mx) ** 2).sum() / mass
    best = ("unknown", -1.0, mx, my, 0.0)
    for shape, k in _VAR_X.items():
        side = float(np.sqrt(k * var_x))
        cy = my - _CENTROID_DROP[shape] * side
        canvas = np.zeros((h + 2 * _PAD, w + 2 * _PAD))
        sy, sx, t = coverage(shape, mx + _PAD, cy + _PAD, side)
        t = t[: canvas.shape[0] - sy.start, : canvas.shape[1] - sx.start]
        canvas[sy.start:sy.start + t.shape[0], sx.start:sx.start + t.shape[1]] = t
        tmpl = canvas[_PAD:-_PAD, _PAD:-_PAD]
        iou = float(np.minimum(cov, tmpl).sum() / np.maximum(np.maximum(cov, tmpl).sum(), 1e-9))
        if iou > best[1]:
            best = (shape, iou, mx, cy, side)
    return best


def detect(img: np.ndarray) -> list[Detection]:
    """Detect the objects in one (H, W, 3) uint8 image."""
    hue, sat, val = _hue(img)
    fg = (val >= MIN_VALUE) & (sat >= MIN_SATURATION)
    names = list(_HUES)
    ref = np.array([_HUES[n] for n in names])
    dist = np.abs((hue[..., None] - ref + 180.0) % 360.0 - 180.0)
    colour_idx = dist.argmin(-1)
    coverage = np.clip(val / _FULL_VALUE, 0.0, 1.0)
    out: list[Detection] = []
    for ci, name in enumerate(names):
        labels, n = ndimage.label(fg & (colour_idx == ci), structure=_STRUCTURE)
        for k in range(1, n + 1):
            mask = labels == k
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            # the antialiased rim lies just outside the thresholded mask: take one ring, same hue only
            region = ndimage.binary_dilation(mask, structure=_STRUCTURE) & (dist[..., ci] < 30.0)
            region &= (labels == k) | (labels == 0)
            cov = np.where(region, coverage, 0.0)
            ys, xs = np.nonzero(region)
            cov = cov[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            shape, iou, cx, cy, side = _fit(cov)
            if iou < MIN_SHAPE_IOU:
                shape = "unknown"
            size = "big" if side > SIZE_SPLIT else "small"
            out.append(Detection(shape, name, size, float(xs.min() + cx), float(ys.min() + cy), area, iou))
    return out


def prompt_holds(prompt: Prompt, dets: list[Detection]) -> bool:
    """Whether the detections are exactly the prompt's objects (one-to-one) and its relation holds."""
    specs = prompt.objects
    if len(dets) != len(specs):
        return False
    for perm in itertools.permutations(dets):
        if all(
            d.shape == s.shape and (s.color is None or d.color == s.color) and (s.size is None or d.size == s.size)
            for d, s in zip(perm, specs)
        ):
            if prompt.relation is None or relation_holds(prompt.relation, (perm[0].cx, perm[0].cy),
                                                         (perm[1].cx, perm[1].cy)):
                return True
    return False


MAX_CREDITED_DETECTIONS = 8  # the largest blobs a partial credit pairs with the prompt's objects


def prompt_credit(prompt: Prompt, dets: list[Detection]) -> float:
    """Partial credit in [0, 1], exactly 1 when :func:`prompt_holds`: each object the prompt asks for earns the
    share of its asked attributes (shape, and colour and size where asked) that its partner detection has, under
    the best one-to-one pairing; a relation earns one more share when it holds between the first two partners;
    the sum over the shares is scaled down by the detections beyond the prompt's count. A denser signal than the
    verdict for a policy gradient: an image with one of two objects right, or the right objects in the wrong
    relation, earns something."""
    specs = prompt.objects
    found = len(dets)
    dets = sorted(dets, key=lambda d: -d.area)[:MAX_CREDITED_DETECTIONS]
    shares = len(specs) + (prompt.relation is not None)

    def attrs(d: Detection, s) -> float:
        asked = [(d.shape, s.shape)] + [(v, w) for v, w in ((d.color, s.color), (d.size, s.size)) if w is not None]
        return sum(v == w for v, w in asked) / len(asked)

    best = 0.0
    k = min(len(specs), len(dets))
    for perm in itertools.permutations(dets, k):
        got = sum(attrs(d, s) for d, s in zip(perm, specs))
        if prompt.relation is not None and k == 2:
            got += relation_holds(prompt.relation, (perm[0].cx, perm[0].cy), (perm[1].cx, perm[1].cy))
        best = max(best, got)
    return best / shares * len(specs) / max(len(specs), found)
