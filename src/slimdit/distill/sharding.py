"""Fully sharded data parallelism (torch FSDP2, ``fully_shard``) by the adapter's units.

Each unit (transformer block) is one shard group and the rest of the model the root's, so a step gathers one
block's weights at a time; the frozen teacher is sharded the same way. It runs over NCCL on GPUs and over gloo on
CPUs, so the CPU tests run the code path a GPU run takes. Parameters, gradients and optimizer states live as
``DTensor`` shards; checkpoints hold full tensors (gathered on save, re-sharded on resume), so a run may resume
on another number of processes.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def shard(adapter, model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over all processes: one ``fully_shard`` per unit, then the root; parameters move
    to ``device``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in adapter.units(model):
        fully_shard(adapter.unit(model, unit), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it), or ``t`` itself."""
    return t.detach().full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: its shard, or ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor) laid out as ``ref`` is: this process's shard when ``ref`` is sharded."""
    if not is_sharded(ref):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)


def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor into ``param``, or into this process's shard of it."""
    with torch.no_grad():
        if is_sharded(param):
            param.to_local().copy_(like(value, param).to_local())
        else:
            param.copy_(value)
