"""Online preference optimisation of a diffusion or flow model from a reward (Diffusion-DPO, Wallace et al. 2024,
run on the model's own groups of images as online DPO does).

Per training prompt the current model samples a group of images with its deterministic sampler, guided as it
samples (:meth:`slimdit.distill.groups.GroupSampling.rollout`); a registered reward scores them (no gradient
needed). The group's best image is the preferred one (``w``) and its worst the rejected one (``l``), a pair only
where the two rewards differ (and the best reaches ``threshold``, when one is set). Both are noised with the same
noise at the same drawn timestep, and the loss is

``-log sigmoid(-beta/2 [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))])``

with ``e`` the per-sample squared error of the guided prediction against the objective's target and ``ref`` the
frozen model before tuning. Lowering the error on the preferred image relative to the reference, and raising it on
the rejected one, is what it rewards; the reference is in the loss itself, so a drift that treats both images alike
(which plain denoising on the model's own images makes, :mod:`slimdit.distill.raft`) cancels. ``beta`` sets how far
the model may go before the sigmoid saturates.

A loss callable of the trainer's shape: the trainer gives it the drawn prompts' rows (``batch.index``) and their
conditioning; the clean latents of the batch only give the latent shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimdit.distill.groups import GroupSampling, repeat_rows, zero_step
from slimdit.distill.losses import Batch, per_sample_mse
from slimdit.distill.steps import batched_guided_prediction


def preference_pairs(rewards: torch.Tensor, group: int, threshold: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (into the flat ``rewards``) of each consecutive group's best and worst image, for the groups whose
    best beats their worst (and reaches ``threshold``); ties go to the earlier row."""
    r = rewards.float().view(-1, group)
    base = torch.arange(r.shape[0], device=r.device) * group
    best = torch.sort(r, dim=1, descending=True, stable=True).indices[:, 0] + base
    worst = torch.sort(r, dim=1, stable=True).indices[:, 0] + base
    ok = rewards[best] > rewards[worst]
    if threshold is not None:
        ok &= rewards[best] >= threshold
    return best[ok], worst[ok]


@dataclass
class DPOLoss(GroupSampling):
    threshold: float | None = None  # the reward a preferred image must reach (None: any better than the worst)
    draws: int = 2  # timesteps (with their noise) each pair is compared at per update
    beta: float = 2000.0  # the preference's inverse temperature (Diffusion-DPO's beta)

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj, g = self.adapter, self.adapter.objective, batch.generator
        inner = getattr(student, "module", student)
        x, cond, null, rewards = self.rollout(student, batch)
        win, lose = preference_pairs(rewards, self.group, self.threshold)
        if win.numel() == 0:  # every group agreed
            return zero_step(student, rewards, "margin", "accuracy", "pairs")
        rows = torch.cat([win, lose])  # the preferred images, then the rejected ones, each ``draws`` times
        x0 = x[rows].repeat_interleave(self.draws, 0)
        c, n = repeat_rows(cond, rows, self.draws), repeat_rows(null, rows, self.draws)
        half = win.numel() * self.draws
        eps = torch.randn((half, *x0.shape[1:]), generator=g).to(x0.device).repeat(2, *[1] * (x0.dim() - 1))
        t = obj.sample_t(half, g, a.image_tokens(inner, x0)).to(x0.device).repeat(2)
        xt, target = obj.noise(x0, eps, t)
        with batch.autocast():
            err = per_sample_mse(batched_guided_prediction(a, student, xt, t, c, n, self.guidance).float(), target)
        with torch.no_grad():
            ref = per_sample_mse(batched_guided_prediction(a, teacher, xt, t, c, n, self.guidance).float(), target)
        gain = (err - ref).view(2, half)  # how much worse than the reference, preferred row 0, rejected row 1
        margin = gain[1] - gain[0]  # > 0: the preferred image's error fell relative to the rejected one's
        loss = -F.logsigmoid(0.5 * self.beta * margin).mean()
        return {"total": loss, "margin": margin.detach().mean(), "accuracy": (margin > 0).float().mean().detach(),
                "reward": rewards.mean(), "pairs": rewards.new_tensor(win.numel() / (rewards.numel() / self.group))}
