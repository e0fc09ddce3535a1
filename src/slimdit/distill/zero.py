"""DeepSpeed ZeRO through accelerate (``train.sharding: zero2 | zero3``), the alternative to slimdit's own FSDP.

ZeRO-2 partitions the student's gradients and optimizer states over the processes (each keeps whole weights);
ZeRO-3 partitions the weights too, gathering each module's for its forward and backward. With
``train.offload_optimizer`` the optimizer states and step live in host memory (the setting Flux-Mini trained with).
The frozen teacher is not DeepSpeed's: it stays whole on each device, in the frozen dtype.

How slimdit drives it:
- The torch optimizer slimdit builds (AdamW) runs inside ZeRO's optimizer, offloaded or not; DeepSpeed is never
  allowed to swap in its own (``zero_force_ds_cpu_optimizer: false``), which would drop betas and eps.
- DeepSpeed clips gradients (at ``train.grad_clip``) and steps inside ``accelerator.backward``; slimdit sets the
  learning rate before each step, as it does without ZeRO.
- On a CPU the processes talk over gloo (named explicitly: accelerate's ``cpu=True`` would drop DeepSpeed).
- Checkpoints: the weights (gathered whole) and the EMA stay slimdit's safetensors; the optimizer partitions are
  DeepSpeed's own checkpoint beside them (``deepspeed/``, one file per process, written and read by the run).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

STAGES = {"zero2": 2, "zero3": 3}
TAG = "state"  # the DeepSpeed checkpoint tag inside each slimdit checkpoint


def world_size() -> int:
    """The number of processes the launcher started (before any accelerator exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator(cfg, mixed_precision: str | None, run: Path):
    """An ``Accelerator`` running ZeRO stage ``cfg.sharding`` with ``cfg.batch_size`` split into micro-batches."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ImportError(f"train.sharding: {cfg.sharding} needs DeepSpeed: pip install 'slimdit[deepspeed]'") from e
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = DeepSpeedPlugin(zero_stage=STAGES[cfg.sharding], gradient_accumulation_steps=cfg.grad_accum,
                             gradient_clipping=cfg.grad_clip,
                             offload_optimizer_device="cpu" if cfg.offload_optimizer else "none",
                             zero3_init_flag=False, zero3_save_16bit_model=False)
    from accelerate.state import AcceleratorState

    # each trainer (a distill run's phases, a test's runs) brings its own ZeRO settings, which accelerate keeps in
    # process-wide state and will not replace: clear that state (the process group, in PartialState, stays)
    AcceleratorState._reset_state()
    kwargs = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    acc = Accelerator(deepspeed_plugin=plugin, mixed_precision=mixed_precision or "no",
                      gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=kwargs, log_with="tensorboard",
                      project_dir=str(run))
    ds = acc.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // (acc.num_processes * cfg.grad_accum)
    ds["train_batch_size"] = cfg.batch_size
    ds["zero_force_ds_cpu_optimizer"] = False
    return acc


def engine(acc):
    return acc.deepspeed_engine_wrapped.engine


def grad_norm(acc) -> torch.Tensor:
    """The global gradient norm of the step just taken (before clipping)."""
    n = engine(acc).get_global_grad_norm()
    return torch.as_tensor(float("nan") if n is None else float(n))


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], stage: int):
    """Whole ``params`` inside the block (a collective under ZeRO-3: every process must enter it)."""
    if stage < 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def save(acc, folder: Path) -> None:
    """DeepSpeed's optimizer (and module) partitions under ``folder/deepspeed`` (every process writes its own)."""
    engine(acc).save_checkpoint(str(folder / "deepspeed"), tag=TAG)


def load(acc, folder: Path) -> None:
    path, _ = engine(acc).load_checkpoint(str(folder / "deepspeed"), tag=TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed state (deepspeed/{TAG}): it was not written by a "
                                "ZeRO run; resume it with the sharding it was trained with")
