"""The detector made soft: a differentiable reward that counts objects and measures each colour against the caption.

The detector's verdict (``detector.py``) counts connected blobs, which has no gradient; the shapes embedder's cosine
has one, but does not see a second copy of an object, the one-step students' commonest mistake. This reward reads
a pixel as the detector does (foreground when bright and saturated, its colour the palette hue nearest its own)
but softly: sigmoids stand in for the two thresholds, and a softmax on the hue angle spreads a pixel's coverage
(its brightness against the palette's) over the six palette hues. It then measures

- **the number of objects**: the expected Euler characteristic of the foreground (8-connected, from the patterns of
  its 2 x 2 windows with each pixel drawn independently; Gray 1971), which for solid blobs is their number;
- **per hue and in all, area and perimeter**: the coverage summed, and its total variation (the length of its
  edges, by the coarea formula).

A caption names its objects' shapes and some of their colours and sizes, so it fixes the number of objects, bounds
each hue's area and perimeter, and allows a few (area, perimeter) pairs in all, one per choice of the sizes it
leaves open. The reward is minus what lies outside: the count in objects, an area in units of the smallest
object's, a perimeter likewise. An object too many costs about 3, a right scene about 0. The count alone could be
gamed by punching holes (a hole lowers the Euler characteristic), and the areas alone miss a second small copy
where the caption leaves the size open; each term closes the other's gap, as a hole adds perimeter. What none of
them sees (which colour sits on which shape, where the objects stand) the detector still judges on the evaluation
prompts.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import torch

from slimdit.worlds.shapes.detector import _FULL_VALUE, _HUES, MIN_SATURATION, MIN_VALUE
from slimdit.worlds.shapes.prompts import Prompt
from slimdit.worlds.shapes.scenes import COLOR_LIST, RESOLUTION, SHAPES, SIZES_LIST, PlacedObject, render

TOLERANCE = 0.15  # each area and perimeter bound is widened by this share: a drawn object is never exactly ideal
HUE_SHARPNESS = 20.0  # softmax weight of cos(hue difference): a palette colour leaks under 0.01 % to its neighbours
VALUE_SOFTNESS = 0.03  # widths of the sigmoids that stand in for the detector's value and saturation thresholds
SATURATION_SOFTNESS = 0.05
DARK = 0.2  # below this brightness a pixel is background to the areas and perimeters (the dark, faintly coloured
DARK_SOFTNESS = 0.05  # noise of a generated background would otherwise add up over the image); edges stay above it
_NAMES = tuple(_HUES)
_ANGLES = torch.tensor([math.radians(_HUES[n]) for n in _NAMES])


def total_variation(c: torch.Tensor) -> torch.Tensor:
    """Isotropic total variation of ``c`` (..., H, W) over the zero-padded image: for a coverage map, the length
    of its edges in pixels."""
    c = torch.nn.functional.pad(c, (1, 1, 1, 1))
    dx = c[..., 1:, 1:] - c[..., 1:, :-1]
    dy = c[..., 1:, 1:] - c[..., :-1, 1:]
    return (dx * dx + dy * dy + 1e-8).sqrt().sum((-2, -1))


@cache
def object_measures(shape: str, size: str) -> tuple[float, float]:
    """(area, perimeter) in pixels of one object as scenes render it, measured as :func:`penalty` measures."""
    image = render([PlacedObject(shape, COLOR_LIST[0], size, RESOLUTION / 2, RESOLUTION / 2)])
    whole = measures(torch.from_numpy(image).permute(2, 0, 1)[None].double() / 127.5 - 1)[2]
    return float(whole[0, 0]), float(whole[0, 1])


@cache
def _units() -> np.ndarray:
    return np.array([min(object_measures(s, z)[k] for s in SHAPES for z in SIZES_LIST) for k in (0, 1)])


@cache
def bounds(prompt: Prompt) -> tuple[np.ndarray, np.ndarray]:
    """What ``prompt`` allows: (2, 2, 6) least and most (area, perimeter) per palette hue (``_HUES`` order; an
    object of unnamed colour may lie in any hue, so it raises every hue's upper bounds), and (K, 2) the (area,
    perimeter) pairs allowed in all, one per choice of the sizes the prompt leaves open."""
    per_hue = np.zeros((2, 2, len(_NAMES)))
    free = np.zeros(2)
    for spec in prompt.objects:
        m = np.array([object_measures(spec.shape, z) for z in ((spec.size,) if spec.size else SIZES_LIST)])
        if spec.color is None:
            free += m.max(0)
        else:
            per_hue[0, :, _NAMES.index(spec.color)] += m.min(0)
            per_hue[1, :, _NAMES.index(spec.color)] += m.max(0)
    per_hue[1] += free[:, None]
    choices = [(spec.size,) if spec.size else SIZES_LIST for spec in prompt.objects]
    totals = np.unique(np.array([np.sum([object_measures(spec.shape, z) for spec, z in zip(prompt.objects, sizes)],
                                        axis=0) for sizes in itertools.product(*choices)]), axis=0)
    return per_hue, totals


def _split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (N, 3, H, W) in [-1, 1] -> (N, H, W) the probability that a pixel is foreground, and (N, 6, H, W)
    its soft coverage of each palette hue."""
    rgb = ((images.float() + 1) / 2).clamp(0, 1)
    r, g, b = rgb.unbind(1)
    mx, mn = rgb.amax(1), rgb.amin(1)
    saturated = torch.sigmoid(((mx - mn) / mx.clamp_min(1e-3) - MIN_SATURATION) / SATURATION_SOFTNESS)
    foreground = torch.sigmoid((mx - MIN_VALUE) / VALUE_SOFTNESS) * saturated
    cover = (mx / _FULL_VALUE).clamp(max=1.0) * saturated * torch.sigmoid((mx - DARK) / DARK_SOFTNESS)
    # the hue angle by its cosine and sine in the opponent plane (no atan2: black pixels have no hue and no NaN)
    u, v = r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)
    norm = (u * u + v * v + 1e-6).sqrt()
    angles = _ANGLES.to(images.device)
    cos = (u[:, None] * angles.cos()[:, None, None] + v[:, None] * angles.sin()[:, None, None]) / norm[:, None]
    return foreground, cover[:, None] * torch.softmax(HUE_SHARPNESS * cos, dim=1)


def euler_number(p: torch.Tensor) -> torch.Tensor:
    """Expected 8-connected Euler characteristic (blobs minus holes) of ``p`` (..., H, W), each pixel foreground
    with its probability independently, from the patterns of the 2 x 2 windows over the zero-padded image:
    (one pixel set - three set - 2 x diagonal pairs) / 4. Exact for a binary image."""
    p = torch.nn.functional.pad(p, (1, 1, 1, 1))
    a, b, c, d = p[..., :-1, :-1], p[..., :-1, 1:], p[..., 1:, :-1], p[..., 1:, 1:]
    qa, qb, qc, qd = 1 - a, 1 - b, 1 - c, 1 - d
    one = a * qb * qc * qd + b * qa * qc * qd + c * qa * qb * qd + d * qa * qb * qc
    three = a * b * c * qd + a * b * d * qc + a * c * d * qb + b * c * d * qa
    diagonal = a * d * qb * qc + b * c * qa * qd
    return ((one - three - 2 * diagonal) / 4).sum((-2, -1))


def measures(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft (N,) object counts, (N, 2, 6) area and perimeter per palette hue, and (N, 2) area and perimeter in all."""
    foreground, cover = _split(images)
    per_hue = torch.stack([cover.sum((-2, -1)), total_variation(cover)], 1)
    whole = cover.sum(1)
    return euler_number(foreground), per_hue, torch.stack([whole.sum((-2, -1)), total_variation(whole)], 1)


def _outside(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return torch.relu(lo - x) + torch.relu(x - hi)


def penalty(prompts: list[Prompt], images: torch.Tensor) -> torch.Tensor:
    """(N,) how far each image lies from what its prompt allows: the soft count's distance from the number of
    objects, plus each hue's area and perimeter outside their bounds and the nearest allowed (area, perimeter) pair's
    distance in all (both beyond the tolerance), in units of the smallest object's area and perimeter."""
    counts, per_hue, whole = measures(images)
    kw = dict(dtype=counts.dtype, device=counts.device)
    units = torch.tensor(_units(), **kw)
    out = []
    for k, prompt in enumerate(prompts):
        hue_bounds, totals = (torch.tensor(b, **kw) for b in bounds(prompt))
        lo, hi = hue_bounds[0] * (1 - TOLERANCE), hue_bounds[1] * (1 + TOLERANCE)
        hues = (_outside(per_hue[k], lo, hi) / units[:, None]).sum()
        whole_off = (torch.relu((whole[k] - totals).abs() - TOLERANCE * totals) / units).sum(1).min()
        out.append((counts[k] - len(prompt.objects)).abs() + hues + whole_off)
    return torch.stack(out)
