"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"):
one student step from ``t`` to ``s`` learns to land where two teacher steps land (``t -> mid -> s``), halving the
sampling steps each round. With a CFG teacher the teacher's steps are guided (Meng et al. 2023, stage two), so the
student samples without CFG, in one pass per step; a teacher with a guidance input gets the scale as its input.

A loss callable of the trainer's shape, for diffusion (DDIM steps) and flow (Euler steps) teachers alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdit.distill.losses import Batch, per_sample_mse
from slimdit.distill.steps import deterministic_step, guided_prediction


@dataclass
class ProgressiveLoss:
    """``|| S(x_t, t) - target ||^2`` in the model's prediction space, where ``target`` is the prediction whose one
    deterministic step from ``x_t`` lands on the teacher's two steps' ``x_s`` (the paper's x-target, written as the
    prediction the objective trains, which weighs it by the objective's own SNR weighting)."""

    adapter: object  # slimdit.models.Adapter, with its objective
    t: torch.Tensor  # (N,) where each student step starts (slimdit.distill.steps.transitions)
    s: torch.Tensor  # (N,) where it lands
    null: dict[str, torch.Tensor] | None = None  # the empty caption's conditioning: CFG teacher at ``guidance``
    guidance: float = 1.0
    # (N,) where the teacher's first step lands: its own 2N-step grid's odd points (a shifted flow grid's are not
    # the halfway points of the N-step one); None: the objective's midpoint
    mid: torch.Tensor | None = None

    def _teacher(self, teacher, x, t, cond, null) -> torch.Tensor:
        return guided_prediction(self.adapter, teacher, x, t, cond, null, self.guidance)

    def target(self, teacher, xt, t, s, cond, null, mid=None) -> torch.Tensor:
        """The prediction at ``(xt, t)`` whose one step lands where the teacher's two steps land (through
        ``mid``, default halfway)."""
        obj = self.adapter.objective
        mid = obj.midpoint(t, s) if mid is None else mid
        x_mid = deterministic_step(obj, xt, self._teacher(teacher, xt, t, cond, null), t, mid)
        x_s = deterministic_step(obj, x_mid, self._teacher(teacher, x_mid, mid, cond, null), mid, s)
        a_t, s_t = obj.coefficients(t, xt)
        a_s, s_s = obj.coefficients(s, xt)
        x0 = (x_s - s_s / s_t * xt) / (a_s - s_s / s_t * a_t)
        _, pred = obj.noise(x0, (xt - a_t * x0) / s_t, t)  # the objective's prediction of that (x0, eps)
        return pred

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj, x0, g = self.adapter, self.adapter.objective, batch.x0, batch.generator
        inner = getattr(student, "module", student)
        b, dev = x0.shape[0], x0.device
        i = torch.randint(0, len(self.t), (b,), generator=g)
        t, s = self.t[i].to(dev), self.s[i].to(dev)
        mid = self.mid[i].to(dev) if self.mid is not None else None
        eps = torch.randn(x0.shape, generator=g).to(dev)
        xt, _ = obj.noise(x0, eps, t)
        cond, null = batch.cond, None
        if a.takes_guidance(teacher):
            cond = {**cond, "guidance": torch.full((b,), self.guidance, device=dev)}
        elif self.null is not None and self.guidance != 1:
            null = {k: v.to(dev).expand(b, *v.shape[1:]) for k, v in self.null.items()}
        with torch.no_grad():
            target = self.target(teacher, xt, t, s, cond, null, mid)
        with batch.autocast():
            pred = a.prediction(inner, a.predict(student, xt, t, cond))
        loss = per_sample_mse(pred, target).mean()
        return {"total": loss, "progressive": loss.detach()}
