"""Trajectory fidelity: how closely a student's predictions follow its teacher's where sampling actually goes.

The teacher's pipeline samples a few prompts once (CFG included) while every transformer call is recorded; a
model's *trajectory MSE* is the mean squared difference between its output and the teacher's on exactly those
calls. Unlike the training loss, it has no noise from the random timesteps and targets of a batch, so it shows
within tens of steps whether distillation moves a student towards its teacher or away from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Trajectories:
    """The recorded calls (positional and keyword arguments) of one sampling run and the teacher's outputs."""

    calls: list[tuple[tuple, dict]]
    teacher_out: list[torch.Tensor]


def _first(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0]
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def record_trajectories(sampler, prompts: list[str], seed: int = 0) -> Trajectories:
    """Sample ``prompts`` (one batch) with a ``PipelineSampler``'s settings and record every call of its pipeline's
    transformer. Tensors shared between calls (text embeddings) are stored once, by reference."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                      {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))

    net = sampler.pipe.transformer
    handle = net.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        generator = torch.Generator(sampler.device).manual_seed(seed)
        sampler.pipe(prompt=list(prompts), generator=generator, **sampler.call_kwargs(output_type="latent"))
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError("the pipeline never called its transformer; nothing to record")
    return Trajectories(calls, [_first(net(*a, **k)).float() for a, k in calls])


@torch.no_grad()
def trajectory_mse(model: nn.Module, traj: Trajectories) -> dict[str, float]:
    """``all``: the mean over every recorded call; ``high_noise`` / ``low_noise``: over the first / last third of
    the sampling steps. The model is put in eval mode for the measurement and restored after."""
    was_training = model.training
    model.eval()
    try:
        errs = [(_first(model(*a, **k)).float() - t).pow(2).mean().item()
                for (a, k), t in zip(traj.calls, traj.teacher_out)]
    finally:
        model.train(was_training)
    third = max(1, len(errs) // 3)
    return {"all": sum(errs) / len(errs), "high_noise": sum(errs[:third]) / third,
            "low_noise": sum(errs[-third:]) / third}


def teacher_validator(pipe, model_id: str, captions: list[str], train):
    """A ``Trainer`` ``validate`` function, or ``None`` when ``train.val_every`` is 0: the student's trajectory MSE
    on the teacher's sampling of the first ``train.val_prompts`` captions, at ``model_id``'s default sampling.
    ``pipe.transformer`` must be the teacher now."""
    from slimdit.pipelines.loading import pipeline_sampler

    if not train.val_every:
        return None
    if not captions:
        raise ValueError("no captions to record validation trajectories on")
    traj = record_trajectories(pipeline_sampler(pipe, model_id, name="teacher"), captions[:train.val_prompts],
                               train.seed)

    def validate(student: nn.Module) -> dict[str, float]:
        m = trajectory_mse(student, traj)
        return {"traj_mse": m["all"], "traj_mse_low_noise": m["low_noise"], "traj_mse_high_noise": m["high_noise"]}

    return validate
