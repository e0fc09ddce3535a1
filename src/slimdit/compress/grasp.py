"""GRASP (thesis section 4.4.4): choose which singular values to keep by their accumulated gradient.

Every layer a plan factors is re-parameterised as ``W(s) = U diag(s) V^T`` with only ``s`` trainable; the loss
is accumulated over a calibration set and ``|dL/ds_j|`` summed; the ``k`` singular values with the largest
sums are kept (instead of the ``k`` largest values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdit.compress.lowrank import replace_module
from slimdit.compress.plan import Plan, svd_layers, validate
from slimdit.models.base import Adapter


class SingularValueLinear(nn.Module):
    """A dense layer written as ``U diag(s) V^T x + b`` with trainable singular values ``s`` only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        U, S, Vh = torch.linalg.svd(linear.weight.detach().float(), full_matrices=False)
        self.register_buffer("U", U)
        self.register_buffer("Vh", Vh)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.s = nn.Parameter(S)
        self.original = linear

    def forward(self, x):
        return F.linear(x, (self.U * self.s) @ self.Vh, self.bias)


def grasp_keep(adapter: Adapter, model: nn.Module, plan: Plan, loss_fn: Callable[[nn.Module], torch.Tensor],
               batches: int) -> dict[str, torch.Tensor]:
    """Return, per factored layer (``unit.path``), the indices of the singular values to keep.

    ``loss_fn(model)`` computes the loss on the next calibration batch; it is called ``batches`` times. The model
    is restored to its original layers afterwards.
    """
    validate(adapter, model, plan)
    swapped: dict[str, tuple[nn.Module, str, SingularValueLinear, int]] = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for op in plan.ops:
            if op.op != "svd":
                continue
            for unit, path, layer, k in list(svd_layers(adapter, model, op)):
                sv = SingularValueLinear(layer)
                replace_module(unit, path, sv)
                swapped[f"{op.unit}.{path}"] = (unit, path, sv, k)
        grads = {name: torch.zeros_like(sv.s) for name, (_, _, sv, _) in swapped.items()}
        for _ in range(batches):
            model.zero_grad(set_to_none=True)
            loss_fn(model).backward()
            for name, (_, _, sv, _) in swapped.items():
                if sv.s.grad is not None:  # a layer the loss does not reach has no gradient
                    grads[name] += sv.s.grad.abs()
        return {name: torch.sort(torch.topk(grads[name], k).indices).values
                for name, (_, _, _, k) in swapped.items()}
    finally:
        for unit, path, sv, _ in swapped.values():
            replace_module(unit, path, sv.original)
        for p in frozen:
            p.requires_grad_(True)
