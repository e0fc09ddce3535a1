"""cmmd: CMMD (Jayasumana et al., 2024) between a model's images and a reference set of captioned images, computed
as google-research/cmmd computes it.

Protocol: one image per reference caption (the paper evaluates on COCO-30k captions against their images); every
image, generated or reference, is centre-cropped to the largest square and PIL-bicubic resized to 336 (the
reference's ``io_util``), embedded by CLIP ViT-L/14@336 (image projection, L2-normalised) and compared with
:func:`slimdit.metrics.cmmd.cmmd`: MMD^2 with a Gaussian RBF kernel, sigma = 10, biased estimator, x 1000.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slimdit.metrics.benchmarks import Benchmark, EvalResult
from slimdit.metrics.external.protocol import (
    REFERENCE_FORM,
    BenchPrompt,
    adapter_scorer,
    check_images_per_prompt,
    embed_all,
    hf_cached,
    protocol_record,
    reference_images,
    reference_rows,
    sample,
    select,
)

NAME = "cmmd"
SIZE = 336  # CLIP ViT-L/14@336's input
CLIP = "openai/clip-vit-large-patch14-336"
DATA_ENV = "SLIMDIT_CMMD_DATA"
CLIP_ENV = "SLIMDIT_CMMD_CLIP"

Embed = Callable[[np.ndarray], Any]  # (B, 336, 336, 3) uint8 -> (B, D) embeddings (a tensor or array)


def clip_source() -> str:
    """The CLIP to load: ``$SLIMDIT_CMMD_CLIP`` (a local directory or hub id), else ViT-L/14@336, from the cache."""
    named = os.environ.get(CLIP_ENV) or None
    if named is not None and Path(named).expanduser().is_dir():
        return str(Path(named).expanduser())
    model = named or CLIP
    if hf_cached(model, "config.json") is None:
        raise FileNotFoundError(
            f"CMMD's CLIP {model!r} is neither a local directory nor in the Hugging Face cache; download it with "
            f"`huggingface-cli download {CLIP}`, or set ${CLIP_ENV} to a local directory holding a CLIP model, "
            "tokenizer and image processor")
    return model


def make_cmmd(embed: Embed | None = None, batch_size: int = 64) -> Benchmark:
    """The ``cmmd`` benchmark; ``embed`` replaces CLIP ViT-L/14@336 (it gets 336 x 336 uint8 images)."""

    def check(limit: int | None = None, data: str | Path | None = None,
              images_per_prompt: int | None = None) -> tuple[Path, list[dict], int]:
        check_images_per_prompt(images_per_prompt, NAME)
        folder, rows = reference_rows(data, DATA_ENV, NAME)
        chosen = select(rows, limit)
        if embed is None:
            clip_source()
        return folder, chosen, len(rows)

    def run(sampler, limit: int | None = None, images_per_prompt: int = 1, seed: int = 0,
            data: str | Path | None = None, progress: bool = True) -> EvalResult:
        folder, rows, n_all = check(limit, data, images_per_prompt)
        emb = embed or _clip(clip_source(), batch_size)
        prompts = [BenchPrompt(r["text"], key=r["file_name"]) for r in rows]
        per_image, images = sample(sampler, prompts, images_per_prompt, seed, progress)
        from slimdit.metrics.cmmd import cmmd
        from slimdit.metrics.embedders import center_crop_resize

        gen = embed_all(emb, (center_crop_resize(im, (SIZE, SIZE)) for im in images), batch_size, progress,
                        "cmmd: generated", len(images))
        ref = embed_all(emb, reference_images(folder, rows, (SIZE, SIZE)), batch_size, progress,
                        "cmmd: reference", len(rows))
        import torch

        metrics = {"cmmd": cmmd(torch.from_numpy(gen), torch.from_numpy(ref)), "n_reference": len(rows),
                   "reference": str(folder), **protocol_record(len(rows), images_per_prompt, seed, n_all, 1)}
        return EvalResult(metrics, per_image, images, None)

    return Benchmark(run=run, check=check, images_per_prompt=1, data=REFERENCE_FORM, embedder=False,
                     scorer=adapter_scorer("cmmd") if embed is None else None)


def _clip(model: str, batch_size: int) -> Embed:
    from slimdit.metrics.embedders import ClipEmbedder

    clip = ClipEmbedder(model, batch_size=batch_size)
    if clip.size != SIZE:
        raise ValueError(f"CMMD uses CLIP ViT-L/14@336, whose input is {SIZE} px; {model!r} takes {clip.size} px")
    return lambda images: clip.embed_images(images).numpy()
