"""Direct reward fine-tuning: the reward's gradient through the sampler (DRaFT, Clark et al. 2024; ReFL, Xu et al.
2023, is its cousin that scores a one-step prediction).

The model samples images for training prompts with its deterministic sampler (DDIM with eta 0, or flow Euler) on
the few-step grid of :func:`slimdit.distill.steps.transitions`. The earlier steps run without a graph; the last
``grad_steps`` keep theirs (DRaFT-K; K = 1 is the variant the paper finds best for its cost). The VAE decodes the
final latents with gradients, a differentiable reward scores the pixels, and the loss is the negative mean reward.
The VAE and the reward model stay frozen: only the student moves.

``tuned_steps`` (fewer than ``grad_steps``) takes the update from the first graph-carrying steps alone: the later
ones pass the reward's gradient back through their input but hold the model, so only what the early predictions
(layout: which objects, how many) should change moves the weights; the late, texture-setting steps' own gradients
are left out. The weights are shared by all steps, so the late steps still change through them. slimdit's own
variant: DRaFT trains every graph-carrying step, and DRTune (Wu et al. 2024) tunes early steps too but cuts the
gradient through the inputs instead.

An optional KL-like term keeps the student's prediction at the graph-carrying steps near the frozen reference's
(the model before tuning), a guard against reward hacking that DRaFT itself leaves to early stopping. An optional
data term (``data_weight``) adds the model's own denoising loss on the batch's training images, ReFL's guard (its
"pre-training loss"): where the KL holds every prediction where it was, the data term only pulls the images back
toward the data, so what the reward corrects (a count, a colour) may move while a drift away from the data is
resisted. A guidance-distilled model takes guidance 1 there (its unguided prediction, the one the data defines).

A loss callable of the trainer's shape: the trainer gives it the drawn prompts' rows (``batch.index``) and their
conditioning; the clean latents of the batch give the latent shape, and the data term's images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slimdit.distill.losses import Batch, held, per_sample_mse
from slimdit.distill.steps import batched_guided_prediction, deterministic_step, group_conditions, renoise

# (captions, images (N, 3, H, W) in [-1, 1], carrying gradients) -> (N,) rewards, differentiable, higher is better
DifferentiableReward = Callable[[list[str], torch.Tensor], torch.Tensor]


@dataclass
class DraftLoss:
    adapter: object  # slimdit.models.Adapter, with its objective
    captions: list[str]  # the training prompts, one per data row
    reward: DifferentiableReward
    decode: Callable[[torch.Tensor], torch.Tensor]  # latents -> images (N, 3, H, W) in [-1, 1], differentiable
    t: torch.Tensor  # (K,) where each sampling step starts (slimdit.distill.steps.transitions)
    s: torch.Tensor  # (K,) where it lands
    null: dict[str, torch.Tensor] | None = None  # the empty caption's conditioning: CFG at ``guidance``
    guidance: float = 1.0  # CFG scale, or the guidance input of a guidance-distilled model
    group: int = 1  # images per prompt
    grad_steps: int = 1  # the last sampling steps the reward's gradient flows through
    kl: float = 0.0  # weight of the prediction's squared distance to the reference's at the tuned steps
    tuned_steps: int | None = None  # the first graph-carrying steps whose model the update tunes; None: all of them
    data_weight: float = 0.0  # weight of the denoising loss on the batch's training images (ReFL's guard)

    def __post_init__(self):
        if not 1 <= self.grad_steps <= len(self.t):
            raise ValueError(f"grad_steps must lie in 1..{len(self.t)} (the sampler's steps), got {self.grad_steps}")
        if self.tuned_steps is not None and not 1 <= self.tuned_steps <= self.grad_steps:
            raise ValueError(f"tuned_steps must lie in 1..grad_steps ({self.grad_steps}), got {self.tuned_steps}")

    def sample(self, model, batch: Batch, teacher=None) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Final latents of a group per prompt (the last ``grad_steps`` steps carry a graph), their captions, and
        the mean squared distance of the graph-carrying predictions to ``teacher``'s (0 without one)."""
        if batch.index is None:
            raise ValueError("DraftLoss needs the batch's data rows (batch.index) to read their captions")
        obj, a = self.adapter.objective, self.adapter
        dev, dtype = batch.x0.device, batch.x0.dtype
        cond, null = group_conditions(a, getattr(model, "module", model), batch.cond, self.null, self.guidance,
                                      self.group, dev)
        shape = (batch.x0.shape[0] * self.group, *batch.x0.shape[1:])
        x = torch.randn(shape, generator=batch.generator).to(dev, dtype)
        first_grad = len(self.t) - self.grad_steps
        tuned = self.grad_steps if self.tuned_steps is None else self.tuned_steps
        drift = x.new_zeros((), dtype=torch.float32)
        for k, (t, s) in enumerate(zip(self.t, self.s)):
            tt, ss = t.expand(shape[0]).to(dev), s.expand(shape[0]).to(dev)
            hold = model.parameters() if k >= first_grad + tuned else ()  # the gradient passes through the input only
            with held(hold), torch.set_grad_enabled(k >= first_grad and torch.is_grad_enabled()), batch.autocast():
                pred = batched_guided_prediction(a, model, x, tt, cond, null, self.guidance).float()
            if first_grad <= k < first_grad + tuned and teacher is not None and self.kl:
                with torch.no_grad(), batch.autocast():
                    ref = batched_guided_prediction(a, teacher, x, tt, cond, null, self.guidance).float()
                drift = drift + ((pred - ref) ** 2).mean() / tuned
            x = deterministic_step(obj, x.float(), pred, tt, ss).to(dtype)
        captions = [self.captions[int(i)] for i in batch.index.repeat_interleave(self.group)]
        return x, captions, drift

    def data_loss(self, model, batch: Batch) -> torch.Tensor:
        """The model's denoising loss on the batch's clean training latents, at drawn timesteps and noise, unguided."""
        a, x0 = self.adapter, batch.x0
        inner = getattr(model, "module", model)
        xt, target, t = renoise(a.objective, x0, batch.generator, a.image_tokens(inner, x0))
        cond, _ = group_conditions(a, inner, batch.cond, None, 1.0, 1, x0.device)
        with batch.autocast():
            pred = a.prediction(inner, a.predict(model, xt, t, cond)).float()
        return per_sample_mse(pred, target.float()).mean()

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x, captions, drift = self.sample(student, batch, teacher)
        rewards = self.reward(captions, self.decode(x))
        if rewards.shape != (x.shape[0],):
            raise ValueError(f"the reward returned shape {tuple(rewards.shape)} for {x.shape[0]} images")
        total = -rewards.mean() + self.kl * drift
        terms = {"kl": drift.detach(), "reward": rewards.detach().mean(),
                 "reward_std": rewards.detach().std(unbiased=False)}
        if self.data_weight:
            data = self.data_loss(student, batch)
            total = total + self.data_weight * data
            terms["data"] = data.detach()
        return {"total": total, **terms}
