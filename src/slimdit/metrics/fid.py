"""Frechet distance between Gaussian fits of two embedding sets (Heusel et al., 2017), in float64."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def gaussian_stats(feats: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least two (N, D) feature rows, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Return ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Return the Frechet distance between the feature sets ``x`` and ``y``."""
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
