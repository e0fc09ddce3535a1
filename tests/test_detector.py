"""shapes-geneval's detector is validated on ground-truth renders and against shuffled prompts."""

from __future__ import annotations

import numpy as np

from slimdit.worlds.shapes.benchmark import score_images
from slimdit.worlds.shapes.detector import detect, prompt_holds
from slimdit.worlds.shapes.prompts import CATEGORIES, eval_prompts, parse_prompt, render_prompt
from slimdit.worlds.shapes.scenes import PlacedObject, render


def _ground_truth(images_per_prompt: int = 4):
    prompts, images = [], []
    for i, p in enumerate(eval_prompts()):
        for j in range(images_per_prompt):
            prompts.append(p)
            images.append(render_prompt(p, np.random.default_rng((99, i, j))))
    return prompts, np.stack(images)


def test_ground_truth_scores_at_least_099_per_category():
    prompts, images = _ground_truth()
    metrics, _ = score_images(prompts, images, embedder=None)
    for c in CATEGORIES:
        assert metrics[c] >= 0.99, (c, metrics[c])


def test_the_position_diagnosis_tells_a_mirrored_relation_from_missing_objects():
    prompts, images = _ground_truth(images_per_prompt=1)
    metrics, _ = score_images(prompts, images, embedder=None)
    assert metrics["position_objects"] == 1.0 and metrics["position_relation"] == 1.0
    # shapes are left-right symmetric: mirroring keeps every object and turns "left of" into "right of"
    sideways = [k for k, p in enumerate(prompts) if p.relation in ("left of", "right of")]
    assert len(sideways) >= 10
    mirrored = [prompts[k] for k in sideways]
    metrics, correct = score_images(mirrored, images[sideways][:, :, ::-1], embedder=None)
    assert metrics["position_objects"] == 1.0 and metrics["position_relation"] == 0.0 and not correct.any()
    # blank images: no objects, so no relation to judge
    metrics, _ = score_images(mirrored, np.zeros_like(images[sideways]), embedder=None)
    assert metrics["position_objects"] == 0.0 and metrics["position_relation"] is None
    assert "position_objects" not in score_images(prompts[:1], images[:1], embedder=None)[0]


def test_shuffled_prompts_score_at_most_005():
    prompts, images = _ground_truth()
    perm = np.random.default_rng(0).permutation(len(images))
    metrics, _ = score_images(prompts, images[perm], embedder=None)
    assert metrics["overall"] <= 0.05, metrics


def test_each_shape_colour_and_size_is_recognised():
    rng = np.random.default_rng(0)
    for shape in ("circle", "square", "triangle"):
        for color in ("red", "cyan", "magenta"):
            for size in ("small", "big"):
                o = PlacedObject(shape, color, size, float(rng.uniform(8, 24)), float(rng.uniform(8, 24)))
                (d,) = detect(render([o]))
                assert (d.shape, d.color, d.size) == (shape, color, size)
                assert abs(d.cx - o.cx) < 0.5 and abs(d.cy - o.cy) < 0.5


def test_blank_noise_and_wrong_relation_fail():
    p = parse_prompt("a circle to the left of a square")
    assert not prompt_holds(p, detect(np.zeros((32, 32, 3), np.uint8)))
    noise = np.random.default_rng(0).integers(0, 40, (32, 32, 3), dtype=np.uint8)  # dark noise: no objects
    assert detect(noise) == []
    left = render([PlacedObject("circle", "red", "small", 6, 16), PlacedObject("square", "blue", "small", 26, 16)])
    right = render([PlacedObject("circle", "red", "small", 26, 16), PlacedObject("square", "blue", "small", 6, 16)])
    assert prompt_holds(p, detect(left)) and not prompt_holds(p, detect(right))


def test_counting_requires_the_exact_number():
    p = parse_prompt("three triangles")
    objs = [PlacedObject("triangle", "green", "small", x, 16) for x in (5, 16, 27)]
    assert prompt_holds(p, detect(render(objs)))
    assert not prompt_holds(p, detect(render(objs[:2])))
