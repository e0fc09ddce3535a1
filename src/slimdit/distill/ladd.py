"""Latent adversarial diffusion distillation (LADD, Sauer et al. 2024): a few-step student trained by a
discriminator that reads the frozen teacher's features, with no distillation loss beside it.

- **The generator** is the student on its ``K``-step grid, with backward simulation to a drawn step
  (:func:`slimdit.distill.steps.simulate`, as DMD2's), giving the clean sample ``x0``.
- **The discriminator** is the teacher itself, frozen, with one small trainable head per unit (default every unit,
  as LADD reads every block): ``x0`` and a real latent are noised again at a time the objective draws, the teacher
  runs on each with the batch's captions (so its features carry the noise level and the text, which is how LADD
  conditions its heads), and each head gives a logit per image token from that unit's image stream, averaged
  over the tokens.
- **Hinge losses**, per head and image, averaged. (A hinge per head and token, the spatial form, kept less on
  shapes-pixart: 81.4 % against 86.2 %, ``docs/steps.md``.) The heads take one step of
  ``relu(1 - D(real)) + relu(1 + D(fake))`` per student update, on the detached samples; the student then
  minimises ``-D(fake)`` through the teacher (its weights frozen) and the heads (held fixed), so its gradient is
  the teacher's feature space's verdict on its samples.
- **Real latents** are the training data's (``batch.x0``). LADD prefers the teacher's own samples; with a data set
  of teacher samples the two coincide.
- **Matching-aware heads** (``mismatch_weight`` > 0; the matching-aware discriminator of GAN-INT-CLS, Reed et al.
  2016): the heads also see real latents under another row's caption (the batch's captions rolled by one) as
  fakes, ``mismatch_weight * relu(1 + D(real, wrong caption))``. Without it nothing asks the heads to read the
  caption, so they can pass a realistic image of the wrong scene; with it, "real" means "real and of this
  caption", and the student's gradient carries the caption's objects, counts and colours. Rows whose rolled
  conditioning equals their own (a caption twice in the batch) are left out of the term; a batch with none left
  logs it as 0. The captions must be the rows' own: the run refuses caption dropout with it.
- A head step whose loss or gradient is not finite stops the run (:class:`slimdit.errors.TrainingDiverged`) before
  it is applied.

The heads and their optimizer are the loss's state, saved in each checkpoint and restored on resume; over several
processes the heads' gradients are averaged, so their replicas stay equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdit.distill.losses import Batch
from slimdit.distill.steps import average_gradients, first_nonfinite, group_conditions, simulate
from slimdit.errors import TrainingDiverged

#: a head's hidden width (at most): small beside a unit (Flux-dev's 57 heads hold about 45 M parameters)
HEAD_WIDTH = 256


class FeatureHead(nn.Module):
    """One logit of "real" per image from a unit's image stream ``(N, tokens, D)``: a logit per token, averaged
    over the tokens."""

    def __init__(self, width: int):
        super().__init__()
        hidden = min(width, HEAD_WIDTH)
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.float()).squeeze(-1).mean(1)


def check_units(adapter, model: torch.nn.Module, units: list[str] | None) -> list[str]:
    """The units the heads read: ``units`` when all are ``model``'s (default: every unit); else an error naming
    the units there are."""
    have = adapter.units(model)
    if units is None:
        return list(have)
    bad = [u for u in units if u not in have]
    if bad or not units:
        raise ValueError(f"disc_units {bad or units!r}: not units of the teacher ({', '.join(have)})")
    return list(units)


def mismatched(cond: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each row's conditioning replaced by the next row's (rolled by one), and which rows really changed
    ``(N,)`` bool: a caption that appears twice in a row of the batch gives its own conditioning back."""
    wrong = {k: v.roll(1, 0) for k, v in cond.items()}
    first = next(iter(cond.values()))
    n = first.shape[0]
    same = torch.ones(n, dtype=torch.bool, device=first.device)
    for k, v in cond.items():
        same &= (v == wrong[k]).reshape(n, -1).all(1)
    return wrong, ~same


def _key(unit: str) -> str:
    """A unit's head's name (ModuleDict keys cannot hold dots)."""
    return unit.replace(".", "_")


@dataclass
class LADDLoss:
    adapter: object  # slimdit.models.Adapter, with its objective
    teacher: torch.nn.Module  # the discriminator's frozen feature network
    t: torch.Tensor  # (K,) where each of the student's steps starts
    s: torch.Tensor  # (K,) where it lands
    guidance: float = 1.0  # a guidance-embedded teacher's guidance input (also the student's)
    disc_lr: float = 1e-4
    tokens: int | None = None  # image tokens (a dynamically shifted flow schedule draws t by them)
    units: list[str] | None = None  # the units with a head (default: every unit)
    mismatch_weight: float = 0.0  # real latents under another row's caption as fakes (0: none, LADD's form)
    heads: nn.ModuleDict = field(init=False)

    def __post_init__(self):
        self.units = check_units(self.adapter, self.teacher, self.units)
        self.heads = nn.ModuleDict()
        self.opt: torch.optim.Optimizer | None = None
        self.mismatch: torch.Tensor | None = None  # the last head step's mismatch term (logged)

    # ---- state, saved and restored by the trainer ------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        from slimdit.io import optimizer_to_tensors

        if self.opt is None:
            return {}, {}
        opt_t, meta = optimizer_to_tensors(self.opt)
        return ({**{f"heads.{k}": v.detach() for k, v in self.heads.state_dict().items()},
                 **{f"opt.{k}": v for k, v in opt_t.items()}}, {**meta, "widths": self._widths()})

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from slimdit.io import optimizer_from_tensors

        if not tensors:
            return
        dev = next(self.teacher.parameters()).device
        self._build(meta["widths"], dev)  # the heads are built at their first use: build them, then load them
        self.heads.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("heads.")})
        meta = {k: v for k, v in meta.items() if k != "widths"}
        optimizer_from_tensors(self.opt, {k[4:]: v.to(dev) for k, v in tensors.items() if k.startswith("opt.")},
                               meta)

    def _widths(self) -> dict[str, int]:
        return {k: int(h.net[0].normalized_shape[0]) for k, h in self.heads.items()}

    def _build(self, widths: dict[str, int], device) -> None:
        """The heads (seeded, so a resumed run builds the same) and their optimizer, once the widths of the
        features they read are known."""
        if self.opt is not None:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for u in self.units:
                self.heads[_key(u)] = FeatureHead(widths[_key(u)]).to(device)
        self.opt = torch.optim.AdamW(self.heads.parameters(), lr=self.disc_lr, betas=(0.0, 0.99), weight_decay=0.0)

    # ---- one update ------------------------------------------------------------------------------------------
    def generate(self, student, batch: Batch) -> torch.Tensor:
        return simulate(self.adapter, student, batch, self.t, self.s, self.guidance)

    def _logits(self, teacher, x0: torch.Tensor, t: torch.Tensor, batch: Batch, graph: bool,
                cond: dict | None = None) -> torch.Tensor:
        """The discriminator's logits on ``x0`` noised at ``t`` under ``cond`` (default: the batch's captions),
        ``(heads, N)``: each head's logit per image from its unit's features in the teacher. ``graph``: the
        teacher's pass keeps its graph (the student's update, through ``x0``); else only the heads' part has one."""
        a = self.adapter
        cond, _ = group_conditions(a, teacher, batch.cond if cond is None else cond, None, self.guidance, 1,
                                   x0.device)
        eps = torch.randn(x0.shape, generator=batch.generator).to(x0.device)
        xt, _ = a.objective.noise(x0, eps, t)
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()), batch.autocast(), \
                a.capture(teacher, self.units) as feats:
            a.predict(teacher, xt.to(next(teacher.parameters()).dtype), t, cond)
        image = {_key(u): feats[u]["image"] for u in self.units}
        self._build({k: v.shape[-1] for k, v in image.items()}, x0.device)
        return torch.stack([self.heads[k](v) for k, v in image.items()])

    def _t(self, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.adapter.objective.sample_t(x0.shape[0], g, self.tokens).to(x0.device)

    def _disc_step(self, teacher, fake: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One step of the heads: the hinge loss of every head on every image, real latents against the student's
        (detached) samples, both noised at the same drawn times."""
        t = self._t(fake, batch.generator)
        real = self._logits(teacher, batch.x0.float(), t, batch, graph=False)
        loss = F.relu(1 - real).mean() + F.relu(1 + self._logits(teacher, fake, t, batch, graph=False)).mean()
        self.mismatch = None
        if self.mismatch_weight > 0:  # logged at every step (0 where no row got another caption), on every process
            wrong, other = mismatched(batch.cond)
            self.mismatch = loss.new_zeros(())
            if other.any():
                logits = self._logits(teacher, batch.x0.float(), t, batch, graph=False, cond=wrong)
                self.mismatch = F.relu(1 + logits[:, other]).mean()
                loss = loss + self.mismatch_weight * self.mismatch
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.heads.parameters())
        bad = first_nonfinite(loss, self.heads.named_parameters())
        if bad:  # before the step: the heads (saved in every checkpoint) never take a non-finite update
            raise TrainingDiverged(f"the LADD discriminator diverged: {bad} is not finite; its last update was not "
                                   "applied and the last checkpoint is kept (try a lower disc_lr)")
        self.opt.step()
        return loss.detach()

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        x0 = self.generate(student, batch)
        disc = self._disc_step(teacher, x0.detach(), batch)
        t = self._t(x0, batch.generator)
        heads = list(self.heads.parameters())
        for p in heads:  # the heads took this update's step already: no gradient reaches them here
            p.requires_grad_(False)
        try:
            gen = -self._logits(teacher, x0, t, batch, graph=True).mean()
        finally:
            for p in heads:
                p.requires_grad_(True)
        out = {"total": gen, "adv": gen.detach(), "disc": disc}
        if self.mismatch is not None:
            out["mismatch"] = self.mismatch.detach()
        return out
