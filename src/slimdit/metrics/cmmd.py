"""CMMD: maximum mean discrepancy with an RBF kernel on embeddings (Jayasumana et al., 2024).

Matches google-research/cmmd: L2-normalised embeddings, sigma = 10, the biased estimator (V-statistic,
diagonals included), scaled by 1000, reported as MMD^2 without a square root.
"""

from __future__ import annotations

import torch

SIGMA = 10.0
SCALE = 1000.0


def cmmd(x: torch.Tensor, y: torch.Tensor, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """Return CMMD between two embedding sets (N, D) and (M, D); they are L2-normalised here."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"cmmd needs two (N, D) embedding sets of equal D, got {tuple(x.shape)}, {tuple(y.shape)}")
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    y = torch.nn.functional.normalize(y.double(), dim=-1)
    gamma = 1.0 / (2 * sigma**2)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return torch.exp(-gamma * d2).mean()

    return float(scale * (k(x, x) + k(y, y) - 2 * k(x, y)))
