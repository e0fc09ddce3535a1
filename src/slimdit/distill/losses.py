"""KD losses: ``L = L_task + lambda_out L_OutKD + lambda_feat L_FeatKD`` (eq. 4.10), with the per-sample,
per-unit normalisation of eq. 4.11-4.14, and the five presets of thesis section 5.1.4."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass(frozen=True)
class KDPreset:
    task: bool
    output: bool
    feature: bool
    normalized: bool
    lambda_out: float = 1.0
    lambda_feat: float = 1.0
    lambda_task: float = 1.0
    #: unnormalised feature KD only: a weight per unit group (``single``: 0.05), 1 for groups not named, and the
    #: streams compared (None: every stream the adapter names)
    group_weights: tuple[tuple[str, float], ...] = ()
    streams: tuple[str, ...] | None = None


PRESETS = {
    "output": KDPreset(task=False, output=True, feature=False, normalized=False),
    "standard": KDPreset(task=False, output=True, feature=True, normalized=False),
    "hybrid": KDPreset(task=True, output=True, feature=True, normalized=False),
    "normalized": KDPreset(task=False, output=True, feature=True, normalized=True),
    "normalized_hybrid": KDPreset(task=True, output=True, feature=True, normalized=True),
    # published recipes, for side-by-side comparison at the same size and budget
    "tinyfusion": KDPreset(task=True, output=True, feature=False, normalized=False, lambda_task=0.1,
                           lambda_out=0.9),  # TinyFusion (Fang et al. 2025): 0.9 output KD + 0.1 task
    "bk_sdm": KDPreset(task=True, output=True, feature=True, normalized=False),  # BK-SDM: unnormalised out + feat
    # Flux-Mini: denoising + output + per-block feature KD on the image stream, single blocks weighted 0.05
    "flux_mini": KDPreset(task=True, output=True, feature=True, normalized=False, group_weights=(("single", 0.05),),
                          streams=("image",)),
}


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_i||^2 / D for each sample i: (B, ...) -> (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def normalized_kd(task_i: torch.Tensor, teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 4.11-4.14: ``(1/B) sum_i (1/L) sum_l w_il L_il`` with
    ``w_il = (L_task,i / (L_il + eps)) * (sum_k eta_ik / (L eta_il + eps))`` and ``eta_il = sqrt(||T_il||^2 / D_l)``.
    The weights are constants (no gradient)."""
    L = len(teacher)
    losses = torch.stack([per_sample_mse(t, s) for t, s in zip(teacher, student)], 1)  # (B, L)
    with torch.no_grad():
        eta = torch.stack([t.float().pow(2).flatten(1).mean(1).sqrt() for t in teacher], 1)  # (B, L)
        w = (task_i.detach()[:, None] / (losses + EPS)) * (eta.sum(1, keepdim=True) / (L * eta + EPS))
    return (w * losses).mean(1).mean(0)


def kd_loss(preset: KDPreset | str, task_i: torch.Tensor, t_out: torch.Tensor, s_out: torch.Tensor,
            t_feats: list[torch.Tensor], s_feats: list[torch.Tensor], feat_weights: list[float] | None = None
            ) -> dict[str, torch.Tensor]:
    """Return the terms (``task``, ``out``, ``feat``) and their weighted ``total``.

    ``task_i`` is the student's own objective per sample (B,), needed by the normalisation even when the task
    term itself is off.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if len(t_feats) != len(s_feats):
        raise ValueError(f"{len(t_feats)} teacher features vs {len(s_feats)} student features")
    zero = task_i.new_zeros(())
    terms = {"task": task_i.mean() if p.task else zero}
    if p.output:
        terms["out"] = normalized_kd(task_i, [t_out], [s_out]) if p.normalized else per_sample_mse(t_out, s_out).mean()
    else:
        terms["out"] = zero
    if p.feature and t_feats:
        if p.normalized:
            terms["feat"] = normalized_kd(task_i, t_feats, s_feats)
        else:  # a weighted mean over features (equal weights unless the preset weighs unit groups)
            per = torch.stack([per_sample_mse(t, s) for t, s in zip(t_feats, s_feats)], 1)
            w = per.new_tensor(feat_weights if feat_weights is not None else [1.0] * per.shape[1])
            terms["feat"] = ((per * w).sum(1) / w.sum()).mean()
    else:
        terms["feat"] = zero
    terms["total"] = p.lambda_task * terms["task"] + p.lambda_out * terms["out"] + p.lambda_feat * terms["feat"]
    return terms


@dataclass
class Batch:
    """What a loss sees of one micro-batch: clean latents, their conditioning, the generator that draws its noise
    and timesteps (seeded by step, so a resumed run draws the same), the mixed-precision context the student's
    forward runs in (the frozen teacher's targets are computed outside it), and the data rows drawn."""

    x0: torch.Tensor
    cond: dict[str, torch.Tensor]
    generator: torch.Generator
    autocast: Callable[[], AbstractContextManager] = nullcontext
    index: torch.Tensor | None = None  # the rows of the training data (a loss that needs their captions reads them)


@dataclass
class KDLoss:
    """Eq. 4.10 as a loss callable, ``loss(student, teacher, batch) -> terms`` (the shape of EDM's losses): the
    adapter's objective noises ``batch.x0`` at drawn timesteps; teacher and student predict; the terms of ``preset``
    compare outputs and the features of ``pairs`` ((student unit, teacher unit), every stream of each). ``total``
    is what the trainer minimises. A later method (guidance or step distillation) is another such callable."""

    adapter: object  # slimdit.models.Adapter, with its objective
    preset: str = "normalized_hybrid"
    pairs: tuple[tuple[str, str], ...] = ()
    #: the guidance scales a guidance-distilled teacher and its student are compared at, one per sample
    guidance_range: tuple[float, float] = (1.0, 5.0)

    def __call__(self, student: torch.nn.Module, teacher: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        a, obj, x0, g = self.adapter, self.adapter.objective, batch.x0, batch.generator
        inner = getattr(student, "module", student)  # hooks go on the model a DDP wrapper holds
        eps = torch.randn(x0.shape, generator=g).to(x0.device)
        t = obj.sample_t(x0.shape[0], g, a.image_tokens(inner, x0)).to(x0.device)
        xt, target = obj.noise(x0, eps, t)
        cond = batch.cond
        if a.takes_guidance(teacher):  # the student's whole guidance path, not one scale
            lo, hi = self.guidance_range
            cond = {**cond, "guidance": (lo + (hi - lo) * torch.rand(x0.shape[0], generator=g)).to(x0.device)}
        t_units, s_units = [tu for _, tu in self.pairs], [su for su, _ in self.pairs]
        with torch.no_grad(), a.capture(teacher, t_units) as tf:
            t_out = a.predict(teacher, xt, t, cond)
        with batch.autocast(), a.capture(inner, s_units) as sf:
            s_out = a.predict(student, xt, t, cond)
        task_i = per_sample_mse(a.prediction(inner, s_out), target)
        p = PRESETS[self.preset]
        streams = p.streams or a.streams
        weights = dict(p.group_weights)
        w = [weights.get(u.partition(".")[0], 1.0) for u in t_units for _ in streams]
        return kd_loss(p, task_i, t_out, s_out, a.features(tf, t_units, streams), a.features(sf, s_units, streams), w)


@contextmanager
def held(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block ``params`` take no gradient (a graph through them still reaches their inputs); their
    ``requires_grad`` flags come back as they were."""
    params = list(params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
