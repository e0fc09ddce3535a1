"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one; how Flux-dev
was made from a CFG model): a student with a guidance input learns, in one pass, its teacher's classifier-free
guided prediction ``u + w (c - u)`` for guidance scales ``w`` drawn from a range.

It is a loss callable of the trainer's shape, so it runs on any flow or diffusion teacher whose student's adapter
feeds a guidance scale (``cond["guidance"]``): Flux with ``guidance_embeds=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdit.distill.losses import Batch, per_sample_mse


@dataclass
class GuidanceLoss:
    """``|| S(x_t, t, c, w) - (T(x_t, t, null) + w (T(x_t, t, c) - T(x_t, t, null))) ||^2`` with ``w`` uniform in
    ``[w_min, w_max]`` per sample; ``batch.cond`` holds the captions' conditioning, ``null`` the empty caption's."""

    adapter: object  # slimdit.models.Adapter of the student, with its objective
    null: dict[str, torch.Tensor]  # (1, ...) each
    w_min: float = 1.0
    w_max: float = 5.0

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj, x0, g = self.adapter, self.adapter.objective, batch.x0, batch.generator
        inner = getattr(student, "module", student)
        if a.takes_guidance(teacher) or not a.takes_guidance(inner):
            raise ValueError("guidance distillation needs a teacher sampled with classifier-free guidance (no "
                             "guidance input) and a student that takes the guidance scale as an input "
                             f"(teacher takes it: {a.takes_guidance(teacher)}, student: {a.takes_guidance(inner)})")
        b = x0.shape[0]
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        t = obj.sample_t(b, g, a.image_tokens(inner, x0)).to(x0.device)
        w = (self.w_min + (self.w_max - self.w_min) * torch.rand(b, generator=g)).to(x0.device)
        xt, _ = obj.noise(x0, eps, t)
        null = {k: v.to(x0.device).expand(b, *v.shape[1:]) for k, v in self.null.items()}
        with torch.no_grad():
            c = a.predict(teacher, xt, t, batch.cond)
            u = a.predict(teacher, xt, t, null)
            target = u + w.view(-1, *[1] * (x0.ndim - 1)) * (c - u)
        with batch.autocast():
            s = a.predict(student, xt, t, {**batch.cond, "guidance": w})
        loss = per_sample_mse(a.prediction(inner, s), a.prediction(inner, target)).mean()
        return {"total": loss, "guided": loss.detach()}
