"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): the student learns a consistency
function ``f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t)`` that maps every point of the teacher's probability
flow to the same clean sample, so one model samples in any number of steps (1, 2, 4, 8) with diffusers'
``LCMScheduler``.

On the teacher's ``solver_steps``-point DDIM grid (LCM's skipping-step schedule: 50 points, ``t -> t - 20``), the
teacher's guided DDIM step from ``x_t`` lands on ``x_s``; the student's ``f(x_t, t)`` is pulled toward the target
``f(x_s, s)`` under LCM's pseudo-Huber distance. The boundary scalings are LCMScheduler's (``timestep_scaling``
10, ``sigma_data`` 0.5), so ``f`` at the clean end is the identity. The target network is the student itself under
stop-gradient (improved consistency training's choice, Song & Dhariwal 2023, where an EMA target did worse); it
keeps the loss a function of the weights alone, so a resumed run ends where an uninterrupted one ends.

The guidance scale is distilled in at a fixed ``w`` (the student samples without CFG): PixArt has no guidance
input for LCM's w-conditioning. For DDPM-family (epsilon, v) teachers; a flow teacher is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdit.distill.losses import Batch
from slimdit.distill.objectives import DDPM
from slimdit.distill.steps import deterministic_step, guided_prediction

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler's default


def boundary_scalings(t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCMScheduler's ``(c_skip, c_out)`` at timesteps ``t`` (the clean end, ``t <= 0``: ``(1, 0)``)."""
    x = t.clamp_min(0).float().to(like.device).view(-1, *[1] * (like.ndim - 1)) * TIMESTEP_SCALING
    return SIGMA_DATA ** 2 / (x ** 2 + SIGMA_DATA ** 2), x / (x ** 2 + SIGMA_DATA ** 2).sqrt()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """``sqrt((a - b)^2 + c^2) - c`` per sample (mean over elements)."""
    return (((a.float() - b.float()) ** 2 + c ** 2).sqrt() - c).flatten(1).mean(1)


@dataclass
class ConsistencyLoss:
    adapter: object  # slimdit.models.Adapter, with a DDPM-family objective
    t: torch.Tensor  # (K,) the solver grid's points (slimdit.distill.steps.transitions at solver_steps)
    s: torch.Tensor  # (K,) the next point of each (< 0: the clean end)
    null: dict[str, torch.Tensor] | None = None  # the empty caption's conditioning: CFG teacher at ``guidance``
    guidance: float = 1.0
    huber_c: float = 0.001  # LCM's

    def __post_init__(self):
        if not isinstance(self.adapter.objective, DDPM):
            raise ValueError("consistency distillation is built for DDPM-family (epsilon, v) teachers, sampled with "
                             "LCMScheduler; for a flow teacher use method: progressive")

    def _teacher(self, teacher, x, t, cond, null) -> torch.Tensor:
        return guided_prediction(self.adapter, teacher, x, t, cond, null, self.guidance)

    def consistency(self, model, x, t, cond, pred=None) -> torch.Tensor:
        """``f(x, t) = c_skip x + c_out x0_hat``."""
        a, obj = self.adapter, self.adapter.objective
        if pred is None:
            pred = a.prediction(getattr(model, "module", model), a.predict(model, x, t.clamp_min(0), cond))
        c_skip, c_out = boundary_scalings(t, x)
        return c_skip * x + c_out * obj.x0(x, pred.float(), t.clamp_min(0))

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj, x0, g = self.adapter, self.adapter.objective, batch.x0, batch.generator
        b, dev = x0.shape[0], x0.device
        i = torch.randint(0, len(self.t), (b,), generator=g)
        t, s = self.t[i].to(dev), self.s[i].to(dev)
        eps = torch.randn(x0.shape, generator=g).to(dev)
        xt, _ = obj.noise(x0, eps, t)
        cond = batch.cond
        null = None
        if self.null is not None and self.guidance != 1:
            null = {k: v.to(dev).expand(b, *v.shape[1:]) for k, v in self.null.items()}
        with torch.no_grad():
            xs = deterministic_step(obj, xt, self._teacher(teacher, xt, t, cond, null), t, s).to(xt.dtype)
            with batch.autocast():  # at the prediction's precision, as LCM computes it
                target = self.consistency(student, xs, s, cond)  # the student under stop-gradient
        with batch.autocast():
            pred = a.prediction(getattr(student, "module", student), a.predict(student, xt, t, cond))
        loss = pseudo_huber(self.consistency(student, xt, t, cond, pred), target, self.huber_c).mean()
        return {"total": loss, "consistency": loss.detach()}


def lcm_scheduler(scheduler_config: dict, solver_steps: int):
    """The diffusers ``LCMScheduler`` a consistency student samples with: the teacher's betas and prediction type,
    the training grid (``original_inference_steps``) and boundary scalings the loss used."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(scheduler_config, original_inference_steps=solver_steps,
                                    timestep_scaling=TIMESTEP_SCALING, clip_sample=False, thresholding=False,
                                    set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
