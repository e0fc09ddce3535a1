"""Magnitude importance (eq. 4.2 of the thesis): ``M_i = sqrt(sum_{W in B_i} ||W||_F^2)``."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimdit.models.base import Adapter


@torch.no_grad()
def magnitude(adapter: Adapter, model: nn.Module) -> dict[str, float]:
    """Return each unit's weight magnitude; the smallest is the first candidate for compression."""
    return {u: float(torch.sqrt(sum(p.detach().float().pow(2).sum() for p in adapter.unit(model, u).parameters())))
            for u in adapter.units(model)}
