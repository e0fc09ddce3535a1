"""fid: FID (Heusel et al., 2017) between a model's images and a reference set of captioned images, on the
Inception-v3 pool features of the original TensorFlow FID (torch-fidelity's ``inception-v3-compat``, the extractor
torchmetrics' ``FrechetInceptionDistance`` uses), with float64 statistics (:func:`slimdit.metrics.fid.fid`).

Protocol: one image per reference caption (COCO-30k: 30,000 captions and their val2014 images). Each reference
image is centre-cropped to the generated images' aspect and PIL-bicubic resized to their size; both sets then go
through the extractor's own TF1-compatible bilinear resize to 299, as TensorFlow FID resizes.
"""

from __future__ import annotations

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
    device,
    embed_all,
    find_path,
    protocol_record,
    reference_images,
    reference_rows,
    require_package,
    sample,
    select,
)

NAME = "fid"
DATA_ENV = "SLIMDIT_FID_DATA"
WEIGHTS_ENV = "SLIMDIT_FID_INCEPTION"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"

Features = Callable[[np.ndarray], Any]  # (B, H, W, 3) uint8 -> (B, 2048) pool features


def inception_weights() -> Path:
    """``$SLIMDIT_FID_INCEPTION``, or torch-fidelity's weights where it caches them (the torch hub checkpoints)."""
    import torch

    default = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    return find_path(None, WEIGHTS_ENV, [default], "FID's Inception-v3 weights",
                     f"download {WEIGHTS_URL} into {default.parent}, or anywhere and set ${WEIGHTS_ENV} to the file")


def make_fid(features: Features | None = None, batch_size: int = 64) -> Benchmark:
    """The ``fid`` benchmark; ``features`` replaces the Inception extractor."""

    def check(limit: int | None = None, data: str | Path | None = None,
              images_per_prompt: int | None = None) -> tuple[Path, list[dict], int]:
        check_images_per_prompt(images_per_prompt, NAME)
        folder, rows = reference_rows(data, DATA_ENV, NAME)
        chosen = select(rows, limit)
        if features is None:
            require_package("torch_fidelity", "torch-fidelity", NAME, extra="fid")
            inception_weights()
        return folder, chosen, len(rows)

    def run(sampler, limit: int | None = None, images_per_prompt: int = 1, seed: int = 0,
            data: str | Path | None = None, progress: bool = True) -> EvalResult:
        folder, rows, n_all = check(limit, data, images_per_prompt)
        feats = features or _inception(inception_weights())
        prompts = [BenchPrompt(r["text"], key=r["file_name"]) for r in rows]
        per_image, images = sample(sampler, prompts, images_per_prompt, seed, progress)
        from slimdit.metrics.fid import fid

        gen = embed_all(feats, iter(images), batch_size, progress, "fid: generated", len(images))
        ref = embed_all(feats, reference_images(folder, rows, images.shape[1:3]), batch_size, progress,
                        "fid: reference", len(rows))
        metrics = {"fid": fid(gen, ref), "n_reference": len(rows), "reference": str(folder),
                   **protocol_record(len(rows), images_per_prompt, seed, n_all, 1)}
        return EvalResult(metrics, per_image, images, None)

    return Benchmark(run=run, check=check, images_per_prompt=1, data=REFERENCE_FORM, embedder=False,
                     scorer=adapter_scorer("fid") if features is None else None)


def _inception(weights: Path) -> Features:
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    dev = device()
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(weights)).to(dev).eval()

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(dev)  # (B, 3, H, W) uint8
        return net(x)[0].double().cpu().numpy()

    return features
