"""Checkpoints of the shapes world's training runs: complete-or-absent directories of safetensors plus state."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import torch

from slimdit.io import load_tensors, optimizer_from_tensors, optimizer_to_tensors, read_json, save_tensors, write_json


def checkpoints(folder: Path) -> list[Path]:
    """The complete checkpoints under ``folder``, oldest first: a ``step_N.tmp`` left by a kill mid-write is not one
    (it would sort after ``step_N`` and be resumed from, or outlive a complete checkpoint when old ones are pruned)."""
    return sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


def save_checkpoint(folder: Path, step: int, modules: dict, ema: dict, opt, elapsed: float, keep: int) -> None:
    ck = folder / f"step_{step:07d}"
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_tensors(tmp / "model.safetensors", tensors)
    if ema:
        save_tensors(tmp / "ema.safetensors", {f"{name}.{k}": v for name, m in ema.items()
                                               for k, v in m.state_dict().items()})
    opt_t, opt_meta = optimizer_to_tensors(opt)
    save_tensors(tmp / "optimizer.safetensors", opt_t)
    write_json(tmp / "state.json", {"step": step, "elapsed_s": elapsed, "optimizer": opt_meta})
    shutil.rmtree(ck, ignore_errors=True)
    tmp.rename(ck)  # a checkpoint directory exists only once it is complete
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old)


def load_into(modules: dict, tensors: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = f"{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def resume(folder: Path, modules: dict, ema: dict, opt, device) -> tuple[int, float]:
    """Load the last checkpoint under ``folder`` into modules, EMA copies and optimizer; (step, elapsed seconds),
    (0, 0.0) when there is none."""
    if not (cks := checkpoints(folder)):
        return 0, 0.0
    ck = cks[-1]
    load_into(modules, load_tensors(ck / "model.safetensors"))
    if ema:
        load_into(ema, load_tensors(ck / "ema.safetensors"))
    state = read_json(ck / "state.json")
    opt_t = {k: v.to(device) if k.split(".", 1)[1] != "step" else v
             for k, v in load_tensors(ck / "optimizer.safetensors").items()}
    optimizer_from_tensors(opt, opt_t, state["optimizer"])
    return state["step"], state["elapsed_s"]


def hardware(device: torch.device) -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
