"""GRASP (thesis section 4.4.4): choose which singular values to keep by their accumulated gradient.

Every layer a plan factors is re-parameterised as ``W(s) = U diag(s) V^T`` with only ``s`` trainable; the loss
is accumulated over a calibration set and ``|dL/ds_j|`` summed; the ``k`` singular values with the largest
sums are kept (instead of the ``k`` largest values).

A plan asks for it with ``grasp: {images: N, batch_size: B, data: SET}`` (:class:`slimdit.compress.plan.Grasp`);
:func:`grasp_from_data` then takes the model's own objective on ``N`` cached calibration images as the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimdit.compress.lowrank import replace_module
from slimdit.compress.plan import Grasp, Plan, svd_layers, validate
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
        # the factors stay float32 (as the SVD was taken); a half-precision model's activations are cast to meet them
        return F.linear(x.to(self.U.dtype), (self.U * self.s) @ self.Vh, self.bias).to(x.dtype)


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


def calibration_loss(adapter: Adapter, data, images: int, batch_size: int, seed: int = 0
                     ) -> tuple[Callable[[nn.Module], torch.Tensor], int]:
    """The model's own objective (the adapter's: epsilon, v or velocity MSE) on the first ``images`` samples of
    ``data`` (a :class:`slimdit.distill.trainer.Conditioning`), batch after batch, at seeded timesteps drawn over
    the whole range (thesis: all timesteps); and how many batches cover them once."""
    if len(data) < images:
        raise ValueError(f"plan grasp.images = {images}, but the calibration set holds only {len(data)} images; "
                         "lower grasp.images or give a larger grasp.data")
    batches = math.ceil(images / batch_size)
    g = torch.Generator().manual_seed(seed)
    calls = [0]

    def loss(model: nn.Module) -> torch.Tensor:
        i = calls[0]
        calls[0] += 1
        idx = torch.arange(i * batch_size, min((i + 1) * batch_size, images))
        dev = next(model.parameters()).device
        x0 = data.latents[idx].to(dev)
        cond = {k: v.to(dev) for k, v in data.take(idx).items()}
        obj = adapter.objective
        eps = torch.randn(x0.shape, generator=g).to(dev)
        t = obj.sample_t(len(idx), g, adapter.image_tokens(model, x0)).to(dev)
        xt, target = obj.noise(x0, eps, t)
        if adapter.takes_guidance(model):  # a guidance-distilled model: its trained range of scales
            cond["guidance"] = (1.0 + 4.0 * torch.rand(len(idx), generator=g)).to(dev)
        pred = adapter.prediction(model, adapter.predict(model, xt, t, cond))
        return (pred.float() - target.float()).pow(2).mean()

    return loss, batches


def grasp_from_data(adapter: Adapter, model: nn.Module, plan: Plan, data, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """:func:`grasp_keep` with the settings of ``plan.grasp`` and :func:`calibration_loss` on ``data``."""
    spec = plan.grasp or Grasp()
    loss, batches = calibration_loss(adapter, data, spec.images, spec.batch_size, seed)
    return grasp_keep(adapter, model, plan, loss, batches)
