"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): the student learns a consistency
function ``f(x_t, t)`` that maps every point of the teacher's probability flow to the same clean sample, so one model
samples in any number of steps (1, 2, 4, 8): predict the clean sample, noise it again to the next timestep, repeat.

On the teacher's ``solver_steps``-point grid (LCM's skipping-step schedule: for a diffusion teacher 50 DDIM points,
``t -> t - 20``; for a flow teacher its own shifted Euler grid), the teacher's guided deterministic step from ``x_t``
lands on ``x_s``; the student's ``f(x_t, t)`` is pulled toward the target ``f(x_s, s)`` under LCM's pseudo-Huber
distance.

- **Diffusion teachers (epsilon, v)**: ``f = c_skip(t) x_t + c_out(t) x0_hat`` with LCMScheduler's boundary
  scalings (``timestep_scaling`` 10, ``sigma_data`` 0.5), and the student samples with diffusers' ``LCMScheduler``.
- **Flow teachers**: ``f = x_t - sigma_t v`` (the flow's own clean-sample estimate, the identity at ``sigma = 0``
  with no scalings), and the student samples with diffusers' ``FlowMatchLCMScheduler``, which takes exactly that
  estimate and noises it again to the next sigma.

The target network is LCM's exponential moving average of the student (:class:`EMATargetConsistencyLoss`, decay
0.95 in LCM and in ``slimdit steps`` by default), a state the trainer saves in its checkpoints; or the student itself
under stop-gradient (:class:`ConsistencyLoss`, improved consistency training's choice, Song & Dhariwal 2023), which
measured worse on both shapes teachers. A resumed run ends where an uninterrupted one ends either way.

Guidance: a CFG teacher's scale is distilled in at a fixed ``w`` (the student samples without CFG; PixArt has no
guidance input to condition on). A guidance-embedded teacher (Flux-dev) takes ``w`` as its input, and so does the
student: at a fixed ``w``, or, with ``guidance_range``, LCM's w-conditioning, a ``w`` drawn per sample from the
range for teacher and student alike, so the student samples at any scale within it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from slimdit.distill.losses import Batch
from slimdit.distill.objectives import DDPM, RectifiedFlow
from slimdit.distill.steps import deterministic_step, group_conditions, guided_prediction

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
    adapter: object  # slimdit.models.Adapter, with a DDPM-family or rectified-flow objective
    t: torch.Tensor  # (K,) the solver grid's points (slimdit.distill.steps.transitions at solver_steps)
    s: torch.Tensor  # (K,) the next point of each (the clean end: < 0 for DDPM, 0 for flow)
    null: dict[str, torch.Tensor] | None = None  # the empty caption's conditioning: CFG teacher at ``guidance``
    guidance: float = 1.0  # the CFG scale, or a guidance-embedded teacher's input
    huber_c: float = 0.001  # LCM's
    # a guidance-embedded teacher: the student takes w as its input too (None: the teacher takes none)
    guidance_input: bool = False
    guidance_range: tuple[float, float] | None = None  # w-conditioning: w drawn uniformly per sample from it

    def __post_init__(self):
        if not isinstance(self.adapter.objective, DDPM | RectifiedFlow):
            raise ValueError(f"consistency distillation needs a DDPM-family or flow objective, not "
                             f"{type(self.adapter.objective).__name__}")
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            if not self.guidance_input:
                raise ValueError("guidance_range (w-conditioning) needs a teacher with a guidance input (a "
                                 "guidance-distilled model such as Flux-dev); a CFG teacher is distilled at one "
                                 "scale")
            if not 0 <= lo <= hi:
                raise ValueError(f"guidance_range {list(self.guidance_range)}: need 0 <= low <= high")

    def _target(self, student: torch.nn.Module) -> torch.nn.Module:
        """The target network: the student itself (under stop-gradient)."""
        return student

    # ---- the loss ------------------------------------------------------------------------------------------------
    def consistency(self, model, x, t, cond, pred=None) -> torch.Tensor:
        """``f(x, t)``: ``c_skip x + c_out x0_hat`` (diffusion), ``x - sigma v`` (flow)."""
        a, obj = self.adapter, self.adapter.objective
        if pred is None:
            pred = a.prediction(getattr(model, "module", model), a.predict(model, x, t.clamp_min(0), cond))
        x0 = obj.x0(x, pred.float(), t.clamp_min(0))
        if isinstance(obj, RectifiedFlow):
            return x0
        c_skip, c_out = boundary_scalings(t, x)
        return c_skip * x + c_out * x0

    def _conditions(self, teacher, batch: Batch, b: int, dev) -> tuple[dict, dict | None]:
        """The batch's conditioning as teacher and student see it (a guidance input, or the CFG null), with LCM's
        w-conditioning's scale drawn per sample where a range is given."""
        cond, null = group_conditions(self.adapter, teacher, batch.cond, self.null, self.guidance, 1, dev)
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            cond["guidance"] = (lo + (hi - lo) * torch.rand(b, generator=batch.generator)).to(dev)
        return cond, null

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj, x0, g = self.adapter, self.adapter.objective, batch.x0, batch.generator
        b, dev = x0.shape[0], x0.device
        i = torch.randint(0, len(self.t), (b,), generator=g)
        t, s = self.t[i].to(dev), self.s[i].to(dev)
        eps = torch.randn(x0.shape, generator=g).to(dev)
        xt, _ = obj.noise(x0, eps, t)
        cond, null = self._conditions(teacher, batch, b, dev)
        target_net = self._target(student)
        with torch.no_grad():
            pred_t = guided_prediction(a, teacher, xt, t, cond, null, self.guidance)
            xs = deterministic_step(obj, xt, pred_t, t, s).to(xt.dtype)
            with batch.autocast():  # at the prediction's precision, as LCM computes it
                target = self.consistency(target_net, xs, s, cond)  # under stop-gradient
        with batch.autocast():
            pred = a.prediction(getattr(student, "module", student), a.predict(student, xt, t, cond))
        loss = pseudo_huber(self.consistency(student, xt, t, cond, pred), target, self.huber_c).mean()
        return {"total": loss, "consistency": loss.detach()}


@dataclass
class EMATargetConsistencyLoss(ConsistencyLoss):
    """:class:`ConsistencyLoss` with LCM's target network: an exponential moving average of the student at decay
    ``target_ema``, a copy of the student at the first update, moved toward it after each optimizer step. The trainer
    saves it in each checkpoint (``loss.safetensors``) and restores it on resume."""

    target_ema: float = 0.95  # LCM's
    target: torch.nn.Module | None = field(default=None, repr=False)
    _pending: dict | None = field(default=None, repr=False)  # a restored target, loaded once the copy exists

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"target_ema {self.target_ema}: an EMA decay in [0, 1)")

    def _target(self, student: torch.nn.Module) -> torch.nn.Module:
        if self.target is None:
            # in fp32: a bf16 copy would lose updates smaller than its resolution (a twentieth of each step)
            self.target = copy.deepcopy(getattr(student, "module", student)).float().requires_grad_(False).eval()
            if self._pending is not None:
                self.target.load_state_dict(self._pending)
                self._pending = None
        return self.target

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        if self.target is None:
            return dict(self._pending or {}), {"target": self._pending is not None}
        return {k: v.detach() for k, v in self.target.state_dict().items()}, {"target": True}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if not meta.get("target"):
            return
        if self.target is None:
            self._pending = tensors
        else:
            self.target.load_state_dict(tensors)

    @torch.no_grad()
    def after_step(self, student: torch.nn.Module) -> None:
        """After each optimizer step the target moves toward the student: ``target += (1 - decay)(student -
        target)``."""
        target = self._target(student)
        for e, p in zip(target.parameters(), getattr(student, "module", student).parameters(), strict=True):
            e.lerp_(p.detach().to(e.dtype), 1 - self.target_ema)


def lcm_scheduler(scheduler_config: dict, solver_steps: int):
    """The diffusers scheduler a consistency student samples with. A diffusion teacher's: ``LCMScheduler`` with its
    betas and prediction type, the training grid (``original_inference_steps``) and the boundary scalings the loss
    used. A flow teacher's: ``FlowMatchLCMScheduler`` with its shift (static or dynamic), whose step takes the
    clean-sample estimate ``x - sigma v`` the loss trained and noises it again to the next sigma."""
    from diffusers import FlowMatchLCMScheduler, LCMScheduler

    from slimdit.distill.objectives import objective_for

    if isinstance(objective_for(scheduler_config), RectifiedFlow):
        return FlowMatchLCMScheduler.from_config(scheduler_config)
    return LCMScheduler.from_config(scheduler_config, original_inference_steps=solver_steps,
                                    timestep_scaling=TIMESTEP_SCALING, clip_sample=False, thresholding=False,
                                    set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
