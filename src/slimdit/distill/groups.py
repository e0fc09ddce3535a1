"""What the reward methods that learn from groups of sampled images share (:mod:`slimdit.distill.grpo`,
:mod:`slimdit.distill.raft`, :mod:`slimdit.distill.dpo`): the models and reward a group is drawn and scored with,
the deterministic guided rollout, and the helpers that pick rows out of a group."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from slimdit.distill.losses import Batch
from slimdit.distill.steps import batched_guided_prediction, deterministic_sample, group_conditions


@dataclass
class GroupSampling:
    """A group of images per training prompt, sampled along the grid ``(t, s)`` and scored by ``reward``."""

    adapter: object  # slimdit.models.Adapter, with its objective
    captions: list[str]  # the training prompts, one per data row
    reward: Callable[[list[str], np.ndarray], np.ndarray]  # (captions, uint8 images) -> (N,) higher is better
    decode: Callable[[torch.Tensor], np.ndarray]  # latents -> uint8 (N, H, W, 3)
    t: torch.Tensor  # (K,) where each sampling step starts (slimdit.distill.steps.transitions)
    s: torch.Tensor  # (K,) where it lands
    null: dict[str, torch.Tensor] | None = None  # the empty caption's conditioning: CFG at ``guidance``
    guidance: float = 1.0  # CFG scale, or the guidance input of a guidance-distilled model
    group: int = 8  # images sampled per prompt

    def captions_of(self, batch: Batch) -> list[str]:
        """The caption of every image of the batch's groups."""
        if batch.index is None:
            raise ValueError(f"{type(self).__name__} needs the batch's data rows (batch.index) to read their captions")
        return [self.captions[int(i)] for i in batch.index.repeat_interleave(self.group)]

    def score(self, captions: list[str], x: torch.Tensor) -> torch.Tensor:
        """The reward of the clean latents ``x``, one float per image, on ``x``'s device."""
        rewards = torch.as_tensor(np.asarray(self.reward(captions, self.decode(x)), dtype=np.float32)).to(x.device)
        if rewards.shape != (x.shape[0],):
            raise ValueError(f"the reward returned shape {tuple(rewards.shape)} for {x.shape[0]} images")
        return rewards

    @torch.no_grad()
    def rollout(self, model, batch: Batch) -> tuple[torch.Tensor, dict, dict | None, torch.Tensor]:
        """Clean latents of a group per prompt, sampled deterministically by ``model`` as it samples (guided at
        ``guidance``); how each was guided (its conditioning, and the empty caption's for CFG, as
        :func:`group_conditions` gives them) and their rewards."""
        captions = self.captions_of(batch)
        dev, dtype = batch.x0.device, batch.x0.dtype
        cond, null = group_conditions(self.adapter, getattr(model, "module", model), batch.cond, self.null,
                                      self.guidance, self.group, dev)
        noise = torch.randn((batch.x0.shape[0] * self.group, *batch.x0.shape[1:]), generator=batch.generator)
        x = deterministic_sample(self.adapter, model, noise.to(dev, dtype), cond, null, self.guidance, self.t, self.s,
                                 batch.autocast, predict=batched_guided_prediction).to(dtype)
        return x, cond, null, self.score(captions, x)


def zero_step(student: torch.nn.Module, rewards: torch.Tensor, *names: str) -> dict[str, torch.Tensor]:
    """The terms of a step with nothing to learn from: a zero loss that still reaches every trainable parameter (Adam
    sees zero gradients), ``names`` logged as 0, and the rollout's mean reward."""
    zero = sum(p.sum() for p in student.parameters() if p.requires_grad) * 0.0
    return {"total": zero, **{n: zero.detach() for n in names}, "reward": rewards.mean()}


def repeat_rows(d: dict | None, rows: torch.Tensor, draws: int) -> dict | None:
    """``d``'s ``rows``, each repeated ``draws`` times (None stays None)."""
    return None if d is None else {k: v[rows].repeat_interleave(draws, 0) for k, v in d.items()}
