"""Where a pipeline's components live while a run does not need them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


def _device(m: nn.Module) -> torch.device | None:
    return next((t.device for t in [*m.parameters(), *m.buffers()]), None)


@contextmanager
def parked(pipe, names: list[str], where: str = "cpu") -> Iterator[list[str]]:
    """Move the components ``names`` of ``pipe`` to ``where`` (host memory) for the block, each back to its device
    after; yields the names it moved. Training needs the text encoders and the VAE only to fill its caches, so they
    wait here instead of holding device memory (T5-XXL alone is 9.5 GB in bf16)."""
    moved: dict[str, torch.device] = {}
    for name in names:
        m = getattr(pipe, name, None)
        dev = _device(m) if isinstance(m, nn.Module) else None
        if dev is not None and dev != torch.device(where):
            m.to(where)
            moved[name] = dev
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        yield list(moved)
    finally:
        for name, dev in moved.items():
            getattr(pipe, name).to(dev)


def frozen_components(pipe) -> list[str]:
    """The pipeline's modules other than its transformer: text encoders, VAE."""
    return [n for n, m in pipe.components.items() if isinstance(m, nn.Module) and n != "transformer"]
