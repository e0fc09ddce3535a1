"""Training objectives: how to noise clean latents and what the model must predict."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EpsilonDDPM:
    """Epsilon prediction on a DDPM schedule (PixArt): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps, target eps."""

    alphas_cumprod: torch.Tensor
    name: str = "epsilon"

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1 - betas, 0).float())

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self.alphas_cumprod), (n,), generator=generator)

    def noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * eps, eps


OBJECTIVES = {"epsilon": EpsilonDDPM.linear}
