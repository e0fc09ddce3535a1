"""Learning-rate shapes shared by every training loop: linear warm-up, then constant or a cosine to zero."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, end: int, anneal_from: int | None = None) -> float:
    """The learning rate of ``step`` relative to the peak: linear warm-up over ``warmup`` steps, then 1, or, from
    step ``anneal_from`` on, a cosine that reaches 0 at step ``end``."""
    factor = min(1.0, (step + 1) / warmup)
    if anneal_from is not None and step >= anneal_from:
        factor *= 0.5 * (1 + math.cos(math.pi * (step - anneal_from) / max(1, end - anneal_from)))
    return factor
