"""Distribution matching distillation, DMD2's form (Yin et al. 2024): a few-step student whose samples' distribution
is pulled onto the teacher's.

- **The generator** is the student on its ``K``-step grid (:func:`slimdit.distill.steps.transitions`). Each update
  draws one of its steps ``k``; *backward simulation* runs the student itself from noise through the steps before
  ``k`` (no graph), so it trains on the inputs it will meet when sampling; its prediction at ``t_k`` gives the
  clean sample ``x0``.
- **The distribution matching gradient.** ``x0`` is noised again at a time ``t`` the objective draws; the frozen
  teacher (the real score, with CFG) and a trainable *fake score* (a copy of the teacher that learns the student's
  own distribution) each predict the clean sample. Their difference, divided by the mean distance of ``x0`` to the
  teacher's prediction (DMD's per-sample weighting), is the gradient of the KL between the two distributions; the
  loss ``0.5 ||x0 - sg(x0 - grad)||^2`` applies it.
- **Two time-scale update rule.** After each student update the fake score takes ``fake_updates`` denoising steps
  (the objective's own loss, conditioned, without CFG) on the student's samples (the same ``x0``, fresh noise and
  times), so it tracks the student as it moves. No regression loss is needed (DMD2's point).
- **The GAN head (optional, ``gan_weight > 0``).** DMD2's classification branch: a small head on the fake score's
  features at one unit (its image stream, averaged over tokens; default the middle unit, as DMD2 reads the UNet's
  bottleneck) tells noised real latents (``batch.x0``, the data) from noised student samples. It learns with the
  fake score, in the same steps: their loss adds ``gan_d_weight`` times the head's logistic loss (real against
  the student's samples, which the denoising pass already ran). The student adds ``gan_weight`` times the
  non-saturating generator loss, through the fake score's frozen weights to its samples. Real data, which the
  distribution matching term never sees, so enters: DMD2's remedy for a fake score that loses the student's modes.
- **The regression loss (optional, ``regression``).** DMD1's other remedy (Yin et al. 2023): the student's whole
  sampler, run from the noise of the teacher's (noise, sample) pairs, is regressed onto the teacher's samples
  (:class:`slimdit.distill.direct.DirectLoss`), weighed by ``regression_weight``. It anchors the student to the
  teacher's modes, one per noise; the data rows are then the pairs, so the GAN head's real latents are the
  teacher's samples (as LADD prefers).
- A fake-score step whose loss or gradient is not finite stops the run (:class:`slimdit.errors.TrainingDiverged`)
  before it is applied, so no checkpoint ever holds a non-finite fake score.

The fake score and its optimizer are the loss's state: the trainer saves them in each checkpoint
(:meth:`DMDLoss.state`) and restores them on resume, so a resumed run ends where an uninterrupted one ends. Over
several processes the fake score's gradients are averaged, so its replicas stay equal.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdit.distill.losses import Batch, held
from slimdit.distill.steps import (
    average_gradients,
    batched_guided_prediction,
    first_nonfinite,
    group_conditions,
    renoise,
    simulate,
)
from slimdit.errors import TrainingDiverged


class GANHead(nn.Module):
    """DMD2's classification branch: one logit of "real" per sample from a unit's image stream ``(N, tokens, D)``,
    averaged over its tokens."""

    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.float().mean(1)).squeeze(-1)


def check_gan_unit(adapter, model: torch.nn.Module, unit: str | None) -> str | None:
    """``unit`` when it is one of ``model``'s units (or None); else an error naming the units there are."""
    if unit is not None and unit not in adapter.units(model):
        raise ValueError(f"gan_unit {unit!r} is not a unit of the teacher ({', '.join(adapter.units(model))})")
    return unit


@dataclass
class DMDLoss:
    adapter: object  # slimdit.models.Adapter, with its objective
    teacher: torch.nn.Module  # the real score's model, whose copy starts the fake score
    t: torch.Tensor  # (K,) where each of the student's steps starts
    s: torch.Tensor  # (K,) where it lands
    null: dict[str, torch.Tensor] | None = None  # the empty caption's conditioning: the teacher's CFG
    guidance: float = 1.0  # the teacher's CFG scale (or its guidance input, also the student's)
    fake_updates: int = 5  # fake score steps per student update (DMD2's two time-scale rule)
    fake_lr: float = 1e-4
    tokens: int | None = None  # image tokens (a dynamically shifted flow schedule draws t by them)
    gan_weight: float = 0.0  # the student's GAN loss weight; 0: no GAN head
    gan_d_weight: float = 1e-2  # the head's loss weight in the fake score's steps
    gan_unit: str | None = None  # the unit whose features the head reads (default: the middle one)
    regression: object | None = None  # a DirectLoss on the teacher's pairs (DMD1's regression); None: DMD2's form
    regression_weight: float = 0.0  # its weight (read only with a regression)
    fake: torch.nn.Module = field(init=False)
    head: GANHead | None = field(init=False, default=None)

    def __post_init__(self):
        self.fake = copy.deepcopy(self.teacher).float().requires_grad_(True).train()
        self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=self.fake_lr, weight_decay=0.0)
        if self.gan_weight > 0:
            units = self.adapter.units(self.fake)
            self.gan_unit = check_gan_unit(self.adapter, self.fake, self.gan_unit) or units[len(units) // 2]

    # ---- state, saved and restored by the trainer ------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        from slimdit.io import optimizer_to_tensors

        opt_t, meta = optimizer_to_tensors(self.fake_opt)
        head = {} if self.head is None else {f"head.{k}": v.detach() for k, v in self.head.state_dict().items()}
        return ({**{f"fake.{k}": v.detach() for k, v in self.fake.state_dict().items()}, **head,
                 **{f"fake_opt.{k}": v for k, v in opt_t.items()}}, meta)

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from slimdit.io import optimizer_from_tensors

        dev = next(self.fake.parameters()).device
        self.fake.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("fake.")})
        if "head.net.1.weight" in tensors:  # the head is built at its first use: build it, then load it
            self._head(tensors["head.net.1.weight"].shape[1], dev)
            self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        optimizer_from_tensors(self.fake_opt, {k[9:]: v.to(dev) for k, v in tensors.items()
                                               if k.startswith("fake_opt.")}, meta)

    # ---- one update ------------------------------------------------------------------------------------------
    def _conditions(self, batch: Batch, model) -> tuple[dict, dict | None]:
        return group_conditions(self.adapter, model, batch.cond, self.null, self.guidance, 1, batch.x0.device)

    def generate(self, student, batch: Batch) -> torch.Tensor:
        """The student's clean sample at a drawn step of its grid, after backward simulation to that step."""
        return simulate(self.adapter, student, batch, self.t, self.s, self.guidance)

    def _noised(self, x0: torch.Tensor, g: torch.Generator):
        return renoise(self.adapter.objective, x0, g, self.tokens)

    def _head(self, width: int, device) -> GANHead:
        """The GAN head, built (seeded, so a resumed run builds the same) and given to the fake score's optimizer
        at its first use, when the width of the features it reads is known."""
        if self.head is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.head = GANHead(width).to(device)
            self.fake_opt.add_param_group({"params": list(self.head.parameters())})
        return self.head

    def _predict(self, xt: torch.Tensor, t: torch.Tensor, cond: dict, batch: Batch
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fake score's prediction at ``xt``, and the GAN head's logits on its features there (None without
        a head)."""
        a = self.adapter
        units = [self.gan_unit] if self.gan_weight > 0 else []
        with batch.autocast(), a.capture(self.fake, units) as feats:
            pred = a.prediction(self.fake, a.predict(self.fake, xt, t, cond)).float()
        if not units:
            return pred, None
        image = feats[self.gan_unit]["image"]
        return pred, self._head(image.shape[-1], image.device)(image)

    def _trained(self):
        return [*self.fake.parameters(), *(self.head.parameters() if self.head is not None else [])]

    def _nonfinite(self, loss: torch.Tensor) -> str | None:
        """What of the fake score's step is not finite: its loss, or the first gradient that is not (None: all are)."""
        return first_nonfinite(loss, [*self.fake.named_parameters(), *(
            self.head.named_parameters(prefix="gan_head") if self.head is not None else [])])

    def _fake_step(self, x0: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One denoising step of the fake score on the student's samples ``x0`` (detached), with the GAN head's
        loss (real data against those samples) when there is one: (denoising loss, head loss or None)."""
        a = self.adapter
        cond, _ = self._conditions(batch, self.fake)
        xt, target, t = self._noised(x0, batch.generator)
        pred, fake_logits = self._predict(xt, t, cond, batch)
        disc = None
        if fake_logits is not None:
            real_xt, _ = a.objective.noise(batch.x0.float(), torch.randn(x0.shape, generator=batch.generator).to(
                x0.device), t)
            _, real_logits = self._predict(real_xt, t, cond, batch)
            disc = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        loss = F.mse_loss(pred, target.float())
        total = loss if disc is None else loss + self.gan_d_weight * disc
        self.fake_opt.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(self._trained())
        bad = self._nonfinite(total)
        if bad:  # before the step: the fake score (saved in every checkpoint) never takes a non-finite update
            raise TrainingDiverged(f"the DMD fake score diverged: {bad} is not finite; its last update was not "
                                   "applied and the last checkpoint is kept (try a lower fake_lr)")
        self.fake_opt.step()
        return loss.detach(), None if disc is None else disc.detach()

    def _generator_gan(self, x0: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The student's non-saturating GAN loss: the head's verdict on its noised samples, through the fake score's
        weights, held fixed (no gradient reaches them or the head; they took this update's steps already)."""
        cond, _ = self._conditions(batch, self.fake)
        xt, _, t = self._noised(x0, batch.generator)
        with held(self._trained()):
            _, logits = self._predict(xt, t, cond, batch)
        return F.softplus(-logits).mean()

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj = self.adapter, self.adapter.objective
        x0 = self.generate(student, batch)
        xt, _, t = self._noised(x0.detach(), batch.generator)
        cond, null = self._conditions(batch, teacher)
        fcond, _ = self._conditions(batch, self.fake)
        with torch.no_grad():
            real = obj.x0(xt.float(), batched_guided_prediction(a, teacher, xt, t, cond, null, self.guidance).float(),
                          t)
            with batch.autocast():
                fake = obj.x0(xt.float(), a.prediction(self.fake, a.predict(self.fake, xt, t, fcond)).float(), t)
            scale = (x0.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-5).view(-1, *[1] * (x0.dim() - 1))
            grad = (fake - real) / scale
        dm = 0.5 * F.mse_loss(x0, (x0 - grad).detach())
        out = {"total": dm, "dm": dm.detach()}
        steps = [self._fake_step(x0.detach(), batch) for _ in range(self.fake_updates)]
        out["fake"] = torch.stack([f for f, _ in steps]).mean()
        if self.gan_weight > 0:  # after the fake score's steps: its weights must not change under this graph
            gan = self._generator_gan(x0, batch)
            out.update(total=out["total"] + self.gan_weight * gan, gan=gan.detach(),
                       disc=torch.stack([d for _, d in steps]).mean())
        if self.regression is not None:
            reg = self.regression(student, teacher, batch)["total"]
            out.update(total=out["total"] + self.regression_weight * reg, regression=reg.detach())
        return out
