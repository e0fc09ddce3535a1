"""The shapes world's soft count (``shapes-count``): the detector's count made differentiable."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from slimdit.worlds.shapes.prompts import TrainingSet, eval_prompts
from slimdit.worlds.shapes.scenes import COLOR_LIST, SHAPES, SIZES, SIZES_LIST, ObjectSpec, PlacedObject, place, render
from slimdit.worlds.shapes.soft_count import euler_number, object_measures, penalty


def _x(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() / 127.5 - 1


def test_the_euler_number_is_blobs_minus_holes_on_binary_images():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.45, 0.7):
        img = rng.random((40, 24, 24)) < density
        want = []
        for m in img:
            blobs = ndimage.label(m, structure=np.ones((3, 3)))[1]  # 8-connected foreground
            holes = ndimage.label(~np.pad(m, 1))[1] - 1  # 4-connected background, less the outside
            want.append(blobs - holes)
        got = euler_number(torch.from_numpy(img).double())
        assert got.tolist() == pytest.approx(want, abs=1e-9)


def test_areas_and_perimeters_of_rendered_objects_are_their_geometry():
    for shape in SHAPES:
        for size in SIZES_LIST:
            area, perimeter = object_measures(shape, size)
            side = SIZES[size]
            ideal = {"circle": (math.pi * side**2 / 4, math.pi * side), "square": (side**2, 4 * side),
                     "triangle": (side**2 / 2, side * (1 + math.sqrt(5)))}[shape]
            assert area == pytest.approx(ideal[0], rel=0.05)
            assert perimeter == pytest.approx(ideal[1], rel=0.1)


def test_right_scenes_cost_nothing_and_each_object_too_many_or_too_few_costs():
    stream, rng = TrainingSet(0), np.random.default_rng(0)
    right, more, fewer, recoloured = [], [], [], []
    for i in range(150):
        prompt, objs = stream.scene(i)
        right.append(float(penalty([prompt], _x(render(objs)[None]))))
        extra = ObjectSpec(SHAPES[rng.integers(3)], COLOR_LIST[rng.integers(6)], SIZES_LIST[rng.integers(2)])
        try:
            crowded = place([ObjectSpec(o.shape, o.color, o.size) for o in objs] + [extra], rng)
        except RuntimeError:
            crowded = None
        if crowded is not None:
            more.append(float(penalty([prompt], _x(render(crowded)[None]))))
        if len(objs) > 1:
            fewer.append(float(penalty([prompt], _x(render(objs[1:])[None]))))
        if any(o.color is not None for o in prompt.objects):  # the asked objects drawn in a colour not asked
            unasked = next(c for c in COLOR_LIST if all(o.color != c for o in prompt.objects))
            recoloured.append(float(penalty([prompt], _x(render([replace(o, color=unasked) for o in objs])[None]))))
    assert max(right) < 0.15
    assert min(more) > 0.9 and np.mean(more) > 3
    assert min(fewer) > 0.9
    assert min(recoloured) > 0.9


def test_the_reward_passes_finite_gradients_and_refuses_evaluation_prompts():
    from slimdit.registry import DIFFERENTIABLE_REWARDS

    reward = DIFFERENTIABLE_REWARDS["shapes-count"]()
    stream = TrainingSet(3)
    prompts = [stream.scene(i)[0] for i in range(4)]
    black = np.zeros((1, 32, 32, 3), np.uint8)  # no hue anywhere: no NaN from the hue angle
    one = render([PlacedObject("circle", "red", "big", 16.0, 16.0)])[None]
    x = _x(np.concatenate([black, one, black, one])).float().requires_grad_(True)
    r = reward([p.text for p in prompts], x)
    assert r.shape == (4,) and bool((r <= 0).all())
    r.sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="training prompts only"):
        reward([eval_prompts()[0].text], x[:1])
