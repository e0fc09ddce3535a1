"""KD losses: ``L = L_task + lambda_out L_OutKD + lambda_feat L_FeatKD`` (eq. 4.10), with the per-sample,
per-unit normalisation of eq. 4.11-4.14, and the five presets of thesis section 5.1.4."""

from __future__ import annotations

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


PRESETS = {
    "output": KDPreset(task=False, output=True, feature=False, normalized=False),
    "standard": KDPreset(task=False, output=True, feature=True, normalized=False),
    "hybrid": KDPreset(task=True, output=True, feature=True, normalized=False),
    "normalized": KDPreset(task=False, output=True, feature=True, normalized=True),
    "normalized_hybrid": KDPreset(task=True, output=True, feature=True, normalized=True),
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
            t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
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
        terms["feat"] = (normalized_kd(task_i, t_feats, s_feats) if p.normalized else
                         torch.stack([per_sample_mse(t, s) for t, s in zip(t_feats, s_feats)], 1).mean(1).mean())
    else:
        terms["feat"] = zero
    terms["total"] = terms["task"] + p.lambda_out * terms["out"] + p.lambda_feat * terms["feat"]
    return terms
