"""Direct distillation of the teacher's sampler (Luhman & Luhman 2021, "Knowledge Distillation in Iterative
Generative Models for Improved Sampling Speed"): the teacher's guided deterministic sampling couples each noise
``z`` with the sample ``x0`` it ends at (:func:`slimdit.distill.reflow.teacher_pairs`); the student's own
``steps``-step deterministic sampler, run from the same ``z`` with its graph kept through every step, learns to end
at that ``x0``: ``|| sampler_S(z) - x0 ||^2`` on the clean latents.

Against progressive distillation's halvings, every round of which trains on the previous round's samples (so a
one-step student learns a two-step student, not the teacher), the target here is the teacher's own sample, and the
input is pure noise exactly as at sampling (a diffusion schedule whose last timestep keeps some signal, as PixArt's
does, otherwise trains on inputs that still carry the data). For any teacher, diffusion (DDIM steps) or flow (Euler
steps); a flow teacher also has ``method: reflow``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdit.distill.losses import Batch, per_sample_mse
from slimdit.distill.steps import deterministic_sample


@dataclass
class DirectLoss:
    """``|| x0_S(z) - x0_teacher(z) ||^2`` on the teacher's pairs, where ``x0_S`` is the student's deterministic
    sample on its grid ``(t, s)`` with the gradient through every step; the trainer's data rows hold the pairs'
    ``x0`` as latents, ``noise`` their ``z``. A guidance-embedded student gets the pairs' guidance as its input."""

    adapter: object
    noise: torch.Tensor  # (N, ...) the pairs' noise, row for row with the data's latents (the pairs' x0)
    t: torch.Tensor  # (steps,) where each student step starts (slimdit.distill.steps.transitions)
    s: torch.Tensor  # (steps,) where it lands; the last is the clean end
    guidance: float | None = None  # the guidance input the pairs were made at (guidance-embedded models)

    def sample(self, student: torch.nn.Module, z: torch.Tensor, cond: dict, batch: Batch) -> torch.Tensor:
        """The student's clean sample from ``z`` on its grid, with the graph through every step."""
        return deterministic_sample(self.adapter, student, z, cond, None, 1.0, self.t, self.s, batch.autocast)

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.index is None:
            raise ValueError("DirectLoss needs the batch's data rows (batch.index) to find their noise")
        x0 = batch.x0
        z = self.noise[batch.index].to(x0.device, x0.dtype)
        cond = batch.cond
        if self.guidance is not None and self.adapter.takes_guidance(getattr(student, "module", student)):
            cond = {**cond, "guidance": torch.full((x0.shape[0],), self.guidance, device=x0.device)}
        loss = per_sample_mse(self.sample(student, z, cond, batch), x0).mean()
        return {"total": loss, "direct": loss.detach()}
