"""Reward fine-tuning by group-relative policy gradient (GRPO as Flow-GRPO uses it, Liu et al. 2025; the
policy-gradient view of sampling is DDPO's, Black et al. 2023).

Sampling is a policy: each stochastic step ``x_t -> x_s`` of a DDIM sampler with ``eta > 0`` is a Gaussian whose
mean the model sets (:func:`slimdit.distill.steps.stochastic_step`; for a flow model this is the same posterior
step written for its interpolation, which turns its ODE into an SDE with the same marginals). Per training prompt
the current model samples a group of images; a reward scores them; each image's advantage is its reward
standardised within its group; the loss raises the log-likelihood of the steps of images that beat their group
and lowers it for those that fell short. A KL term keeps each step's mean near a frozen reference (the model
before tuning), so the images do not drift from what the model drew (FID reports whether they did).

One update per sampled batch (on-policy): the importance ratio of PPO's clipped objective is exactly 1 there, so
the loss is the plain policy gradient. Sampling may take fewer steps than the model's default (Flow-GRPO trains
on 10 and samples with 40), and each update trains on a random subset of the stochastic steps.

A loss callable of the trainer's shape: the trainer gives it the drawn prompts' rows (``batch.index``) and their
conditioning; the clean latents of the batch only give the latent shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimdit.distill.groups import GroupSampling
from slimdit.distill.losses import Batch
from slimdit.distill.steps import batched_guided_prediction, group_conditions, stochastic_step


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each consecutive group of ``group`` rewards (0 where a group agrees)."""
    r = rewards.float().view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


@dataclass
class GRPOLoss(GroupSampling):
    eta: float = 1.0  # the sampler's stochasticity (0 would be the deterministic DDIM / Euler sampler)
    train_steps: int | None = None  # stochastic steps each update trains on (a random subset); None: all
    kl: float = 0.0  # weight of the KL to the reference (the frozen model the trainer holds as its teacher)

    def _pred(self, model, x, t, cond, null) -> torch.Tensor:
        return batched_guided_prediction(self.adapter, model, x, t, cond, null, self.guidance)

    @torch.no_grad()
    def rollout(self, model, batch: Batch) -> dict:
        """Sample a group per prompt with ``model`` stochastically (in place of the deterministic rollout); the states,
        each step's landing point and std, and rewards."""
        captions = self.captions_of(batch)
        obj, g = self.adapter.objective, batch.generator
        cond, null = group_conditions(self.adapter, getattr(model, "module", model), batch.cond, self.null,
                                      self.guidance, self.group, batch.x0.device)
        shape = (batch.x0.shape[0] * self.group, *batch.x0.shape[1:])
        dev, dtype = batch.x0.device, batch.x0.dtype
        x = torch.randn(shape, generator=g).to(dev, dtype)
        states, landed, stds = [], [], []
        for t, s in zip(self.t, self.s):
            tt, ss = t.expand(shape[0]).to(dev), s.expand(shape[0]).to(dev)
            with batch.autocast():
                pred = self._pred(model, x, tt, cond, null)
            mean, std = stochastic_step(obj, x, pred.float(), tt, ss, self.eta)
            nxt = (mean + std * torch.randn(shape, generator=g).to(dev)).to(dtype)
            states.append(x)
            landed.append(nxt)
            stds.append(std)
            x = nxt
        return {"states": states, "landed": landed, "stds": stds, "rewards": self.score(captions, x), "cond": cond,
                "null": null}

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        obj, g = self.adapter.objective, batch.generator
        r = self.rollout(student, batch)
        adv = group_advantages(r["rewards"], self.group)
        n = r["rewards"].shape[0]
        stochastic = [k for k, std in enumerate(r["stds"]) if float(std.max()) > 0]
        if self.train_steps is not None and self.train_steps < len(stochastic):
            pick = torch.randperm(len(stochastic), generator=g)[:self.train_steps].sort().values
            stochastic = [stochastic[int(i)] for i in pick]
        policy = kl = adv.new_zeros(())
        for k in stochastic:
            x, nxt, std = r["states"][k], r["landed"][k], r["stds"][k]
            tt, ss = self.t[k].expand(n).to(x.device), self.s[k].expand(n).to(x.device)
            with batch.autocast():
                pred = self._pred(student, x, tt, r["cond"], r["null"])
            mean, _ = stochastic_step(obj, x, pred.float(), tt, ss, self.eta)
            var = 2 * std.float() ** 2
            # the step's log-likelihood, up to a constant, per dimension (as DDPO averages it)
            logp = -((nxt.float() - mean) ** 2 / var).flatten(1).mean(1)
            policy = policy - (adv * logp).mean() / len(stochastic)
            if self.kl:
                with torch.no_grad():
                    ref, _ = stochastic_step(obj, x, self._pred(teacher, x, tt, r["cond"], r["null"]).float(), tt,
                                             ss, self.eta)
                kl = kl + ((mean - ref) ** 2 / var).flatten(1).mean(1).mean() / len(stochastic)
        total = policy + self.kl * kl
        return {"total": total, "policy": policy.detach(), "kl": kl.detach(), "reward": r["rewards"].mean(),
                "reward_std": r["rewards"].std(unbiased=False)}
