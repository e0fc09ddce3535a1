"""Training objectives: how to noise clean latents and what the model must predict."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DDPM:
    """A DDPM schedule, x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, with target eps (PixArt) or
    v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""

    alphas_cumprod: torch.Tensor
    name: str = "epsilon"

    @classmethod
    def linear(cls, name: str = "epsilon", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0).float(), name)

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        return xt, eps if self.name == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0


OBJECTIVES = {"epsilon": lambda: DDPM.linear("epsilon"), "v_prediction": lambda: DDPM.linear("v_prediction")}


def pipeline_objective(default: str, scheduler_config) -> str:
    """The objective a pipeline's model was trained with: its scheduler's ``prediction_type`` when that names
    an objective of the same family as ``default`` (an adapter's), else ``default``."""
    pred = (scheduler_config or {}).get("prediction_type")
    return pred if default in OBJECTIVES and pred in OBJECTIVES else default
