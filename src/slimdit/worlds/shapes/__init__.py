"""The shapes world: coloured shapes on a plain background, a built-in teacher, a ground-truth sampler, a benchmark,
an embedder and a training stream. It sits on top of the core like a user would: :func:`register` (the
``slimdit.worlds`` entry point) publishes its names into :mod:`slimdit.registry`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from slimdit.data.datasets import CaptionImages
    from slimdit.metrics.embedders import Embedder
    from slimdit.pipelines.sampling import Sampler


def register() -> None:
    """Publish the built-in models, sampler, benchmark, embedder, reward, dataset spec and ``teacher`` commands."""
    from slimdit import registry
    from slimdit.worlds.shapes.benchmark import SHAPES_GENEVAL
    from slimdit.worlds.shapes.cli import add_teacher_commands

    registry.MODELS["shapes-pixart"] = shapes_pixart
    registry.MODELS["shapes-flux"] = shapes_flux
    registry.SAMPLERS["shapes-oracle"] = shapes_oracle
    registry.BENCHMARKS["shapes-geneval"] = SHAPES_GENEVAL
    registry.EMBEDDERS["shapes"] = shapes_embedder
    registry.REWARDS["shapes-geneval"] = shapes_geneval_reward
    registry.REWARDS["shapes-geneval-credit"] = shapes_geneval_credit_reward
    registry.DIFFERENTIABLE_REWARDS["shapes-embedder"] = shapes_embedder_reward
    registry.DIFFERENTIABLE_REWARDS["shapes-embedder-choice"] = shapes_embedder_choice_reward
    registry.DIFFERENTIABLE_REWARDS["shapes-count"] = shapes_count_reward
    registry.DATASETS["shapes-train"] = shapes_train
    registry.COMMANDS["teacher"] = add_teacher_commands
    registry.COMPONENTS["PixelSpaceVAE"] = "slimdit.worlds.shapes.pixel_vae"


def pipeline_dir(name: str) -> Path:
    """The shipped diffusers pipeline directory of built-in model ``name``."""
    d = Path(str(resources.files(__name__).joinpath("weights", name)))
    if not (d / "model_index.json").exists():
        raise FileNotFoundError(f"built-in model {name!r} has no weights at {d}; rebuild them with "
                                "the `slimdit teacher` commands (see the README)")
    return d


def shapes_pixart() -> Path:
    return pipeline_dir("shapes-pixart")


def shapes_flux() -> Path:
    return pipeline_dir("shapes-flux")


def shapes_oracle() -> Sampler:
    from slimdit.worlds.shapes.oracle import OracleSampler

    return OracleSampler()


def shapes_embedder() -> Embedder:
    from slimdit.worlds.shapes.embedder import load_shapes_embedder

    return load_shapes_embedder()


def shapes_geneval_reward():
    from slimdit.worlds.shapes.rewards import geneval_reward

    return geneval_reward


def shapes_geneval_credit_reward():
    from slimdit.worlds.shapes.rewards import geneval_credit_reward

    return geneval_credit_reward


def shapes_embedder_reward():
    from slimdit.worlds.shapes.rewards import embedder_reward

    return embedder_reward()


def shapes_embedder_choice_reward():
    from slimdit.worlds.shapes.rewards import embedder_choice_reward

    return embedder_choice_reward()


def shapes_count_reward():
    from slimdit.worlds.shapes.rewards import soft_count_reward

    return soft_count_reward()


def shapes_train(spec: str) -> CaptionImages:
    """``shapes-train:N[:SEED[:CATEGORIES]]``: the first N (caption, image) pairs of the seeded training stream; with
    CATEGORIES (comma-separated, e.g. ``position,counting``), the first N of the stream whose prompts are of those
    categories."""
    import itertools

    import numpy as np

    from slimdit.data.datasets import CaptionImages
    from slimdit.worlds.shapes.prompts import CATEGORIES, TrainingSet
    from slimdit.worlds.shapes.scenes import render

    parts = spec.split(":")
    try:
        n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (ValueError, IndexError) as e:
        raise ValueError(f"dataset {spec!r}: expected shapes-train:N, shapes-train:N:SEED or "
                         "shapes-train:N:SEED:CATEGORIES") from e
    if len(parts) > 4 or n < 1:
        raise ValueError(f"dataset {spec!r}: expected shapes-train:N[:SEED[:CATEGORIES]] with N ≥ 1")
    stream = TrainingSet(seed)
    if len(parts) < 4:
        caps, imgs = stream.batch(0, n)
        return CaptionImages(caps, imgs, f"shapes-train:{n}:{seed}")
    cats = parts[3].split(",")
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"dataset {spec!r}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown))}; allowed: {', '.join(CATEGORIES)}")
    scenes = itertools.islice((sc for sc in map(stream.scene, itertools.count()) if sc[0].category in cats), n)
    caps, imgs = zip(*((p.text, render(objs)) for p, objs in scenes))  # each scene placed once, as item() would
    return CaptionImages(list(caps), np.stack(imgs), f"shapes-train:{n}:{seed}:{','.join(cats)}")
