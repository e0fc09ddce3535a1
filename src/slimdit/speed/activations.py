"""Activation bytes of a KD training step, traced: the real KD loss (:class:`slimdit.distill.losses.KDLoss`) runs
forward and backward under ``FakeTensorMode`` and torch's ``MemTracker`` on small cuts of the model (one and two
units of each group), and the per-unit cost is scaled to the student's units. Nothing is allocated."""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext

import torch
import torch.nn as nn

from slimdit.models import adapter_for
from slimdit.speed.shapes import build_component

#: traced peaks by their inputs: a plan traces the same cut for the student, a fake score or a teacher pass, and
#: its fixes again (a trace takes seconds; its result depends on nothing else)
_TRACED: dict[str, int] = {}


def _trace_kd_step(cls, config, groups: dict[str, tuple[str, str]], counts: dict[str, int], model: str,
                   scheduler_config: dict, batch: int, resolution: int, seq_len: int, preset: str,
                   dtype: torch.dtype, checkpointing: bool, vae_scale: int = 8) -> int:
    """:func:`_traced_kd_step`, remembered for the process by its inputs."""
    key = json.dumps([cls.__module__, cls.__qualname__, config, groups, counts, model, scheduler_config, batch,
                      resolution, seq_len, preset, str(dtype), checkpointing, vae_scale], sort_keys=True, default=str)
    if key not in _TRACED:
        _TRACED[key] = _traced_kd_step(cls, config, groups, counts, model, scheduler_config, batch, resolution,
                                       seq_len, preset, dtype, checkpointing, vae_scale)
    return _TRACED[key]


def _traced_kd_step(cls, config, groups: dict[str, tuple[str, str]], counts: dict[str, int], model: str,
                   scheduler_config: dict, batch: int, resolution: int, seq_len: int, preset: str,
                   dtype: torch.dtype, checkpointing: bool, vae_scale: int = 8) -> int:
    """Peak activation bytes (activations + temporaries) of one KD training step (teacher forward without grad,
    student forward and backward under autocast to ``dtype``, features of every unit paired) on a cut of
    ``counts`` units per group, in float32 weights as the trainer holds them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from slimdit.distill.losses import Batch, KDLoss

    overrides = {groups[g][1]: n for g, n in counts.items()}
    with FakeTensorMode(allow_non_fake_inputs=True):
        # requires_grad stays on (MemTracker hooks every parameter); the loss runs the teacher without grad
        teacher = build_component(cls, config, overrides).eval()
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        adapter = adapter_for(student, scheduler_config)
        units = adapter.units(student)
        x0, cond = fake_inputs(adapter, student, batch, resolution, seq_len, vae_scale)
        tracker = MemTracker()
        tracker.track_external(teacher, student)
        loss = KDLoss(adapter, preset, tuple((u, u) for u in units))
        with tracker:
            autocast = (lambda: torch.autocast("cpu", dtype)) if dtype != torch.float32 else nullcontext
            terms = loss(student, teacher, Batch(x0, cond, torch.Generator().manual_seed(0), autocast))
            terms["total"].backward()
        snap = next(iter(tracker.get_tracker_snapshot("peak").values()))
    from torch.distributed._tools.mem_tracker import _MemRefType

    # what the step adds to the resident weights at its peak: activations, temporaries and the gradients
    # accumulated by then (gradients grow while activations are freed, so the two overlap only partly)
    return int(snap[_MemRefType.ACT] + snap[_MemRefType.TEMP] + snap[_MemRefType.GRAD])


def vae_scale_of(vae: nn.Module | None) -> int:
    """Pixels per latent pixel of a VAE (2 per down block after the first), 8 without one."""
    channels = getattr(getattr(vae, "config", None), "block_out_channels", None)
    return 2 ** (len(channels) - 1) if channels else 8


def fake_inputs(adapter, model, batch: int, resolution: int, seq_len: int, vae_scale: int = 8):
    h = resolution // vae_scale
    return torch.randn(batch, adapter.latent_channels(model), h, h), adapter.dummy_conditioning(model, batch, seq_len)


def activation_bytes(cls, config, adapter, student_counts: dict[str, int], model: str, scheduler_config: dict,
                     batch: int, resolution: int, seq_len: int, preset: str, dtype: torch.dtype,
                     checkpointing: bool, vae_scale: int = 8) -> int:
    """Activation bytes of a KD step of a student with ``student_counts`` units per group: traced on cuts of one
    unit of each group and of two of one group, scaled linearly in the units (each unit's cost is the same at a
    given batch, resolution and caption length)."""
    groups = adapter.groups
    present = [g for g in groups if student_counts.get(g, 0) > 0] or list(groups)
    base_counts = {g: 1 for g in groups}
    args = (model, scheduler_config, batch, resolution, seq_len, preset, dtype, checkpointing, vae_scale)
    base = _trace_kd_step(cls, config, groups, base_counts, *args)
    total = base
    for g in present:
        two = _trace_kd_step(cls, config, groups, {**base_counts, g: 2}, *args)
        total += (two - base) * (student_counts.get(g, 0) - 1)
    for g in groups:
        if student_counts.get(g, 0) == 0:  # a group the student has no unit of: take its one unit back out
            two = _trace_kd_step(cls, config, groups, {**base_counts, g: 2}, *args)
            total -= two - base
    return max(total, 0)
