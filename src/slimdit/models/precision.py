"""Precision: frozen parts (teacher, text encoders, VAE) in bf16 or fp16, the trained student in fp32 or bf16.

A transformer whose weights are in one dtype is called by code that speaks another: the KD loss feeds cached
fp32 conditioning to a bf16 teacher, a bf16 pipeline feeds bf16 latents to an fp32 student. :func:`cast_io`
makes a model take floating inputs in any dtype (cast to its weights' dtype) and return its output in the dtype
of its first floating input, so neither side needs to know. SVD always factors in fp32 (fp64 when
ill-conditioned), whatever the weights' dtype (``slimdit.compress.lowrank``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_dtype(choice: str, device: str) -> torch.dtype:
    """The dtype of the frozen parts: ``auto`` is bf16 on a GPU that has it, else fp32."""
    if choice == "auto":
        on_gpu = str(device).startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if on_gpu else torch.float32
    return DTYPES[choice]


def weights_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _cast(v, dtype: torch.dtype):
    return v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and v.dtype != dtype else v


def _pre(module, args, kwargs):
    dtype = weights_dtype(module)
    first = next((v for v in [*args, *kwargs.values()] if torch.is_tensor(v) and v.is_floating_point()), None)
    module._slimdit_caller_dtype = first.dtype if first is not None else None
    return tuple(_cast(a, dtype) for a in args), {k: _cast(v, dtype) for k, v in kwargs.items()}


def _post(module, _args, _kwargs, out):
    dtype = module._slimdit_caller_dtype
    if dtype is None:
        return None
    if isinstance(out, tuple):
        return (_cast(out[0], dtype), *out[1:])
    if hasattr(out, "sample"):
        out.sample = _cast(out.sample, dtype)
        return out
    return _cast(out, dtype)


def student_copy(teacher: nn.Module, dtype: str) -> nn.Module:
    """A trainable copy of ``teacher`` in ``dtype`` (``fp32`` or ``bf16``), callable in any dtype."""
    return cast_io(copy.deepcopy(teacher).to(DTYPES[dtype]))


def cast_io(model: nn.Module) -> nn.Module:
    """Let ``model`` be called in any floating dtype (see the module docstring); idempotent, kept by copies."""
    if not getattr(model, "_slimdit_cast_io", False):
        model.register_forward_pre_hook(_pre, with_kwargs=True)
        model.register_forward_hook(_post, with_kwargs=True)
        model._slimdit_cast_io = True
    return model
