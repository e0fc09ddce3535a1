"""CKA importance (eq. 4.3 of the thesis): linear CKA between a unit's input and output token features, per
sampling step. Importance is the transformation intensity ``1 - mean CKA``. The same pass records the input-output
MSE that Flux.1 Lite ranks blocks by (``io_mse``)."""

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
    """Accumulate, per unit, stream and sampling step (one forward call = one step), the CKA of the unit's input vs
    its output and the RMS of its output features (thesis fig. 5.12). Every stream the adapter names is recorded
    (Flux double and single blocks: image and text); importance and the default heatmap read the image stream."""

    def __init__(self, adapter: Adapter, model: nn.Module):
        self.adapter, self.model = adapter, model
        self.units = adapter.units(model)
        self.sums: dict[tuple[str, str, int], float] = {}
        self.counts: dict[tuple[str, str, int], int] = {}
        self.sq: dict[tuple[str, str, int], float] = {}  # sum over tokens of mean-square output features
        self.mse: dict[tuple[str, str, int], float] = {}  # sum over samples of the input-output MSE
        self.tokens: dict[tuple[str, str, int], int] = {}
        self._step, self._last_t = -1, None  # the sampling step of the current forward, by its timestep

    def _record(self, unit: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        step = self._step
        for stream, y in outputs.items():
            key = (unit, stream, step)
            c = linear_cka(inputs[stream], y)  # (B,)
            self.sums[key] = self.sums.get(key, 0.0) + float(c.sum())
            self.counts[key] = self.counts.get(key, 0) + c.numel()
            self.sq[key] = self.sq.get(key, 0.0) + float(y.double().pow(2).mean(-1).sum())
            self.tokens[key] = self.tokens.get(key, 0) + y.shape[0] * y.shape[1]
            mse = (y.double() - inputs[stream].double()).pow(2).mean((-1, -2))  # (B,) Flux.1 Lite's criterion
            self.mse[key] = self.mse.get(key, 0.0) + float(mse.sum())

    def _on_forward(self, _module, args, kwargs) -> None:
        """A sampling step is a new timestep: the passes of one step (a CFG pipeline may make two) share it."""
        t = kwargs.get("timestep")
        t = None if t is None else float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
        if t is None or t != self._last_t:
            self._step += 1
            self._last_t = t

    @contextmanager
    def recording(self) -> Iterator[CKARecorder]:
        handle = self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        try:
            with self.adapter.hooked(self.model, self.units, self._record):
                yield self
        finally:
            handle.remove()

    def new_sample(self) -> None:
        """Call between sampling runs, so that step indices restart at 0."""
        self._step, self._last_t = -1, None

    def heatmap(self, stream: str = "image") -> tuple[list[str], torch.Tensor]:
        """(units, tensor (units, steps)) of mean CKA on one stream."""
        steps = 1 + max((s for _, _, s in self.sums), default=-1)
        h = torch.full((len(self.units), steps), float("nan"))
        for (u, st, s), v in self.sums.items():
            if st == stream:
                h[self.units.index(u), s] = v / self.counts[(u, st, s)]
        return self.units, h

    def importance(self, stream: str = "image") -> dict[str, float]:
        """``1 - mean CKA`` per unit: how strongly it transforms its input."""
        units, h = self.heatmap(stream)
        return {u: float(1 - h[i].nanmean()) for i, u in enumerate(units)}

    def io_mse(self, stream: str = "image") -> dict[str, float]:
        """Mean squared difference between each unit's input and output over all recorded steps: how much it
        changes its stream (Flux.1 Lite ranks blocks by this; a small value marks a removal candidate)."""
        out = {}
        for u in self.units:
            keys = [k for k in self.mse if k[0] == u and k[1] == stream]
            n = sum(self.counts[k] for k in keys)
            out[u] = sum(self.mse[k] for k in keys) / n if n else float("nan")
        return out

    def feature_rms(self, stream: str = "image") -> dict[str, float]:
        """RMS of each unit's output features over all recorded steps."""
        out = {}
        for u in self.units:
            sq = sum(v for (n, st, _), v in self.sq.items() if n == u and st == stream)
            tok = sum(v for (n, st, _), v in self.tokens.items() if n == u and st == stream)
            out[u] = (sq / tok) ** 0.5 if tok else float("nan")
        return out
