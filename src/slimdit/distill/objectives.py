"""Training objectives, built from a pipeline's scheduler config: how t is drawn, how clean latents x0 are noised,
what the model must predict, and how x0 is recovered from a prediction.

``t`` is always the scheduler's own timestep (``0 <= t < num_train_timesteps``): an integer for DDPM, a float
``sigma * num_train_timesteps`` for rectified flow, as diffusers' schedulers hand it to a pipeline's transformer.
Adapters turn it into what their model's forward expects (Flux divides by 1000, as ``FluxPipeline`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DDPM:
    """``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, with target eps (``epsilon``, PixArt's) or
    ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0`` (``v_prediction``); ``a_t`` from the scheduler's betas."""

    alphas_cumprod: torch.Tensor
    name: str = "epsilon"

    @classmethod
    def from_config(cls, config: dict) -> DDPM:
        """The betas of any DDPM-family scheduler config (linear, scaled_linear, squaredcos_cap_v2, trained)."""
        from diffusers import DDPMScheduler

        if not {"beta_start", "beta_schedule", "trained_betas"} & set(config):
            raise ValueError("the scheduler config names no betas (beta_start/beta_end/beta_schedule or "
                             "trained_betas); slimdit will not guess a noise schedule")
        sched = DDPMScheduler.from_config(config)
        name = config.get("prediction_type", "epsilon")
        if name not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {name!r} is not supported; allowed: epsilon, v_prediction")
        # a zero-terminal-SNR schedule ends at a_T = 0; sampling clamps it as DPM-Solver does (2^-24)
        return cls(sched.alphas_cumprod.float().clamp_min(2.0 ** -24), name)

    @classmethod
    def linear(cls, name: str = "epsilon", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> DDPM:
        return cls.from_config({"num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
                                "beta_end": beta_end, "beta_schedule": "linear", "prediction_type": name})

    def sample_t(self, n: int, generator: torch.Generator, tokens: int | None = None) -> torch.Tensor:
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator)

    def _a(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[t.long()].view(-1, *([1] * (like.ndim - 1)))

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._a(t, x0)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return xt, eps if self.name == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0

    def x0(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._a(t, xt)
        if self.name == "epsilon":
            return (xt - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * xt - (1 - a).sqrt() * pred

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` of ``x_t = alpha_t x_0 + sigma_t eps``; ``t = -1`` is the clean end (1, 0), where
        DDIM's last step lands (``set_alpha_to_one``)."""
        a = torch.where(t.view(-1, *([1] * (like.ndim - 1))).to(like.device) < 0, torch.ones(()),
                        self._a(t.clamp_min(0), like))
        return a.sqrt(), (1 - a).sqrt()

    def midpoint(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The timestep halfway between ``t`` and ``s`` (integers: rounded down)."""
        return torch.div(t + s, 2, rounding_mode="floor")


def _calculate_shift(tokens: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """``mu`` of FluxPipeline's resolution-dependent shift: linear in the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return tokens * m + base_shift - m * base_seq_len


@dataclass
class RectifiedFlow:
    """Rectified flow (Flux, SD3): ``x_t = (1 - s) x_0 + s eps`` with ``s = t / T``, target the velocity
    ``eps - x_0``. ``s`` is drawn as diffusers' Flux and SD3 trainers draw it
    (``compute_density_for_timestep_sampling``: uniform, logit-normal or mode), then shifted the way the scheduler
    shifts its sampling sigmas (a static ``shift``, or Flux's dynamic ``exp(mu)`` from the image token count), so
    training sees the noise levels sampling visits."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    dynamic: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    weighting: str = "none"  # none (uniform) | logit_normal | mode
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    name: str = "flow"

    @classmethod
    def from_config(cls, config: dict) -> RectifiedFlow:
        unsupported = [k for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "invert_sigmas") if config.get(k)]
        if config.get("time_shift_type", "exponential") != "exponential":
            unsupported.append(f"time_shift_type={config['time_shift_type']}")
        if unsupported:
            raise ValueError(f"flow scheduler options slimdit's training objective does not follow: "
                             f"{', '.join(unsupported)}; it would train at other noise levels than sampling visits")
        return cls(num_train_timesteps=config.get("num_train_timesteps", 1000),
                   shift=config.get("shift", config.get("flow_shift", 1.0)),
                   dynamic=bool(config.get("use_dynamic_shifting", False)),
                   base_seq_len=config.get("base_image_seq_len") or 256,
                   max_seq_len=config.get("max_image_seq_len") or 4096,
                   base_shift=config.get("base_shift") or 0.5, max_shift=config.get("max_shift") or 1.15)

    def _shift(self, s: torch.Tensor, tokens: int | None) -> torch.Tensor:
        if self.dynamic:
            if tokens is None:
                raise ValueError("a dynamically shifted flow schedule needs the image token count")
            mu = _calculate_shift(tokens, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sample_t(self, n: int, generator: torch.Generator, tokens: int | None = None) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting, n, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale,
                                                  generator=generator)
        s = self._shift(u.double().clamp(1e-5, 1.0), tokens)
        return (s * self.num_train_timesteps).float()

    def _s(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (t.to(like.device, torch.float32) / self.num_train_timesteps).view(-1, *([1] * (like.ndim - 1)))

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._s(t, x0)
        return (1 - s) * x0 + s * eps, eps - x0

    def x0(self, xt: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return xt - self._s(t, xt) * pred

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t) = (1 - s, s)``; ``t = 0`` is the clean end."""
        s = self._s(t, like)
        return 1 - s, s

    def midpoint(self, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (t + s) / 2


Objective = DDPM | RectifiedFlow


def objective_for(scheduler_config) -> Objective:
    """The objective a pipeline's model was trained with, read from its scheduler config: rectified flow for the
    flow-matching schedulers, else DDPM with the config's betas and ``prediction_type``. Without a config there is
    no way to know, so that is an error (never a silent epsilon)."""
    if not scheduler_config:
        raise ValueError("no scheduler config: slimdit reads the training objective (DDPM epsilon or v, or rectified "
                         "flow) from the pipeline's scheduler; load the model as a pipeline")
    config = dict(scheduler_config)
    # a config read from disk names its class; one built in memory does not, but only flow schedulers have a
    # ``shift`` and no betas
    cls = config.get("_class_name")
    flow = cls.startswith("FlowMatch") if cls else ("shift" in config and "beta_start" not in config)
    if flow or config.get("use_flow_sigmas"):
        return RectifiedFlow.from_config(config)
    return DDPM.from_config(config)
