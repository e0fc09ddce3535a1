"""CKA importance (eq. 4.3 of the thesis): linear CKA between a unit's input and output token features, per
sampling step. Importance is the transformation intensity ``1 - mean CKA``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from slimdit.models.base import Adapter


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of (..., n, d1) and (..., n, d2) token features, batched over leading dimensions.

    With ``H = I - 11^T/n``, ``HSIC(K, L) = tr(KHLH) / (n-1)^2`` and ``K = XX^T``, ``L = YY^T``:
    ``tr(KHLH) = ||Yc^T Xc||_F^2`` for column-centred ``Xc, Yc``, and the ``(n-1)^2`` cancels in the ratio.
    """
    x = x.double() - x.double().mean(-2, keepdim=True)
    y = y.double() - y.double().mean(-2, keepdim=True)
    xy = (y.transpose(-1, -2) @ x).pow(2).sum((-1, -2))
    xx = (x.transpose(-1, -2) @ x).pow(2).sum((-1, -2))
    yy = (y.transpose(-1, -2) @ y).pow(2).sum((-1, -2))
    return xy / (xx.sqrt() * yy.sqrt()).clamp_min(1e-30)


class CKARecorder:
    """Accumulate, per unit and sampling step (one forward call = one step), the CKA of the unit's input vs its
    output and the RMS of its output features (thesis fig. 5.12)."""

    def __init__(self, adapter: Adapter, model: nn.Module):
        self.adapter, self.model = adapter, model
        self.units = adapter.units(model)
        self.sums: dict[tuple[str, int], float] = {}
        self.counts: dict[tuple[str, int], int] = {}
        self.sq: dict[tuple[str, int], float] = {}  # sum over tokens of mean-square output features
        self.tokens: dict[tuple[str, int], int] = {}
        self._calls: dict[str, int] = {}

    @contextmanager
    def recording(self) -> Iterator[CKARecorder]:
        handles = []
        for u in self.units:
            def hook(_m, args, kwargs, out, name=u):
                x = args[0] if args else kwargs["hidden_states"]
                y = out[0] if isinstance(out, tuple) else out
                step = self._calls.get(name, 0)
                self._calls[name] = step + 1
                c = linear_cka(x, y)  # (B,)
                self.sums[(name, step)] = self.sums.get((name, step), 0.0) + float(c.sum())
                self.counts[(name, step)] = self.counts.get((name, step), 0) + c.numel()
                self.sq[(name, step)] = self.sq.get((name, step), 0.0) + float(y.double().pow(2).mean(-1).sum())
                self.tokens[(name, step)] = self.tokens.get((name, step), 0) + y.shape[0] * y.shape[1]
            handles.append(self.adapter.unit(self.model, u).register_forward_hook(hook, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def new_sample(self) -> None:
        """Call between sampling runs, so that step indices restart at 0."""
        self._calls.clear()

    def heatmap(self) -> tuple[list[str], torch.Tensor]:
        """(units, tensor (units, steps)) of mean CKA."""
        steps = 1 + max((s for _, s in self.sums), default=-1)
        h = torch.full((len(self.units), steps), float("nan"))
        for (u, s), v in self.sums.items():
            h[self.units.index(u), s] = v / self.counts[(u, s)]
        return self.units, h

    def importance(self) -> dict[str, float]:
        """``1 - mean CKA`` per unit: how strongly it transforms its input."""
        units, h = self.heatmap()
        return {u: float(1 - h[i].nanmean()) for i, u in enumerate(units)}

    def feature_rms(self) -> dict[str, float]:
        """RMS of each unit's output features over all recorded steps."""
        out = {}
        for u in self.units:
            sq = sum(v for (n, _), v in self.sq.items() if n == u)
            tok = sum(v for (n, _), v in self.tokens.items() if n == u)
            out[u] = (sq / tok) ** 0.5 if tok else float("nan")
        return out
