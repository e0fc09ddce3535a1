"""shapes-geneval: GenEval's protocol in the shapes world, plus FID, CMMD and CLIP score.

Four images per prompt; an image counts when the detector finds exactly the prompt's objects (and its
relation); per-category accuracy; overall = mean over categories. FID and CMMD compare the generated images
with ground-truth renders of the same prompts (2,000 by default) through the embedder.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from functools import lru_cache

import numpy as np
import torch

from slimdit.io import files_fingerprint
from slimdit.metrics.benchmarks import Benchmark, EvalResult, code_digest, image_seeds
from slimdit.metrics.clip_score import clip_score
from slimdit.metrics.cmmd import cmmd
from slimdit.metrics.embedders import Embedder, get_embedder
from slimdit.metrics.fid import fid
from slimdit.pipelines.sampling import Sampler
from slimdit.worlds.shapes.detector import detect, prompt_holds
from slimdit.worlds.shapes.prompts import CATEGORIES, Prompt, eval_prompts, render_prompt

REFERENCE_SEED = 424242
REFERENCE_SIZE = 2000


def select_prompts(limit: int | None = None) -> list[Prompt]:
    """The first ``limit`` evaluation prompts, interleaved so that every category is represented."""
    ps = list(eval_prompts())
    by_cat = {c: [p for p in ps if p.category == c] for c in CATEGORIES}
    interleaved = [p for group in zip(*by_cat.values()) for p in group]
    if limit is not None and not 1 <= limit <= len(interleaved):
        raise ValueError(f"--limit must be between 1 and {len(interleaved)}, got {limit}")
    return interleaved[:limit]


def reference_images(prompts: tuple[Prompt, ...], n: int = REFERENCE_SIZE) -> np.ndarray:
    """``n`` ground-truth renders cycling over ``prompts``, with seeds no sampler uses."""
    return np.stack([render_prompt(prompts[k % len(prompts)], np.random.default_rng((REFERENCE_SEED, k)))
                     for k in range(n)])


@lru_cache(maxsize=4)
def _reference_embeddings(prompts: tuple[Prompt, ...], n: int, embedder: Embedder) -> torch.Tensor:
    return embedder.embed_images(reference_images(prompts, n))


def score_images(prompts: list[Prompt], images: np.ndarray, embedder: Embedder | None,
                 reference_size: int = REFERENCE_SIZE) -> tuple[dict, np.ndarray]:
    """Score generated images against their prompts; return (metrics, per-image correctness)."""
    dets = [detect(img) for img in images]
    correct = np.array([prompt_holds(p, d) for p, d in zip(prompts, dets)])
    per_cat: dict[str, list[bool]] = defaultdict(list)
    for p, ok in zip(prompts, correct):
        per_cat[p.category].append(bool(ok))
    cats = {c: float(np.mean(v)) for c, v in per_cat.items()}
    metrics = {"overall": float(np.mean(list(cats.values()))), **{c: cats[c] for c in CATEGORIES if c in cats}}
    metrics.update(position_diagnosis(prompts, dets, correct))
    if embedder is not None:
        unique = tuple(dict.fromkeys(prompts))
        ref = _reference_embeddings(unique, reference_size, embedder)
        gen = embedder.embed_images(images)
        metrics["fid"] = fid(gen, ref)
        metrics["cmmd"] = cmmd(gen, ref)
        metrics["clip_score"] = clip_score(gen, embedder.embed_texts([p.text for p in prompts]))
        metrics["embedder"] = embedder.name
    metrics["n_images"] = int(len(images))
    return metrics, correct


def position_diagnosis(prompts: list[Prompt], dets: list, correct: np.ndarray) -> dict[str, float | None]:
    """Why position images fail: ``position_objects``, the share of them that hold the prompt's two objects (the
    relation aside), and ``position_relation``, the share of those in the asked relation. A model that draws both
    objects but ignores the relation word reads about 0.5 on the second (a little under: objects too close stand in
    no relation); None when no image holds both objects. Empty when no position prompt was scored."""
    rows = [k for k, p in enumerate(prompts) if p.category == "position"]
    if not rows:
        return {}
    objects = [k for k in rows if prompt_holds(replace(prompts[k], relation=None), dets[k])]
    return {"position_objects": len(objects) / len(rows),
            "position_relation": float(np.mean(correct[objects])) if objects else None}


def shapes_geneval(sampler: Sampler, limit: int | None = None, images_per_prompt: int = 4, seed: int = 0,
                   embedder: str | Embedder | None = "shapes", reference_size: int = REFERENCE_SIZE,
                   progress: bool = True) -> EvalResult:
    """Run shapes-geneval on a sampler."""
    if images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {images_per_prompt}")
    prompts = select_prompts(limit)
    emb = get_embedder(embedder) if isinstance(embedder, str) else embedder  # load before sampling: fail early
    per_image = [p for p in prompts for _ in range(images_per_prompt)]
    images = sampler.generate([p.text for p in per_image], image_seeds(len(prompts), images_per_prompt, seed),
                              progress=progress)
    metrics, correct = score_images(per_image, images, emb, reference_size)
    metrics.update(images_per_prompt=images_per_prompt, n_prompts=len(prompts), seed=seed)
    return EvalResult(metrics, per_image, images, correct)


_SCORING_SOURCES = ("worlds/shapes/detector.py", "worlds/shapes/scenes.py", "worlds/shapes/prompts.py",
                    "worlds/shapes/benchmark.py", "worlds/shapes/eval_prompts.jsonl", "worlds/shapes/embedder.py",
                    "worlds/shapes/text.py", "metrics/benchmarks.py", "metrics/embedders.py", "metrics/fid.py",
                    "metrics/cmmd.py", "metrics/clip_score.py")


def scoring_digest(root, embedder_dir) -> str:
    """A short digest of the scoring sources' code under ``root`` (the package's folder) and of the embedder's
    weights in ``embedder_dir``."""
    return code_digest(root, _SCORING_SOURCES, files_fingerprint(embedder_dir))


@lru_cache(maxsize=1)
def scorer_digest() -> str:
    """What scores shapes-geneval, as a short digest: the code of the detector, of the evaluation prompts and what
    reads them, of the embedder and of FID, CMMD and the CLIP score, and the shapes embedder's weights. A saved
    evaluation scored by other code or weights is made again, never compared with one scored now; an edit to
    comments or docstrings changes nothing."""
    from importlib import resources

    from slimdit.worlds.shapes.embedder import builtin_embedder_dir

    return scoring_digest(resources.files("slimdit"), builtin_embedder_dir())


SHAPES_GENEVAL = Benchmark(run=shapes_geneval, check=select_prompts, scorer=scorer_digest)
