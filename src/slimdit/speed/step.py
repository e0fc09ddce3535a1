"""One real KD training step at real dimensions, measured: time, throughput, FLOPs, MFU and peak memory.

The teacher and the plan's student are built from ``arch:NAME`` configs (random weights, cut to a few units) or
loaded; the step is the real one (:class:`slimdit.distill.losses.KDLoss` forward and backward, then the optimizer),
under the run's precision (frozen teacher in ``frozen_dtype``, student weights in fp32 with autocast in
``mixed_precision``) and gradient checkpointing. Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU and
torch's ``MemTracker`` (live tensors) on a CPU. MFU is achieved FLOP/s over the device's dense peak, where known.
"""

from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from slimdit.compress.plan import Plan, apply_plan
from slimdit.models import adapter_for

# dense bf16 peak FLOP/s by device name (vendor datasheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    model: str
    device: str
    batch_size: int
    resolution: int
    frozen_dtype: str
    mixed_precision: str
    checkpointing: bool
    optimizer: str
    step_s: float  # median over the timed steps
    samples_per_s: float
    flops_per_step: int  # teacher forward + student forward and backward, as counted by torch
    achieved_tflops: float
    mfu: float | None  # of the device's dense bf16 peak, where known
    peak_bytes: int
    steps: int

    def to_json(self) -> dict:
        return asdict(self)


def build_step(model: str, plan: Plan, batch_size: int, resolution: int | None, *, device: str = "cpu",
               frozen_dtype: str = "fp32", mixed_precision: str = "no", optimizer: str = "came",
               checkpointing: bool = False, kd: str = "normalized_hybrid", max_sequence_length: int | None = None,
               blocks=None):
    """``(step, resolution, teacher, student, opt)``: ``step()`` runs one real KD training step on fresh random
    inputs of the model's shapes."""
    from slimdit.distill.losses import Batch, KDLoss
    from slimdit.distill.trainer import TrainConfig, _optimizer
    from slimdit.models.arch import arch_spec, build_transformer, is_arch, scheduler_config
    from slimdit.models.precision import cast_io
    from slimdit.speed.activations import fake_inputs, vae_scale_of

    if is_arch(model):
        spec = arch_spec(model)
        teacher, sched = build_transformer(model, blocks), scheduler_config(model)
        res, seq = resolution or spec.resolution, max_sequence_length or spec.max_sequence_length
        vae_scale = spec.vae_scale
    else:
        from slimdit.pipelines.loading import load_pipeline, sampling_defaults

        pipe = load_pipeline(model, "cpu")
        teacher, sched = pipe.transformer, dict(pipe.scheduler.config)
        defaults = sampling_defaults(model)
        vae_scale = vae_scale_of(pipe.vae)
        res = resolution or defaults.get("height") or vae_scale * teacher.config.sample_size
        seq = max_sequence_length or defaults["max_sequence_length"]
        del pipe
    student = copy.deepcopy(teacher).train()
    # (its weights keep requires_grad, which MemTracker's gradient hooks need; KDLoss runs it under no_grad)
    teacher = cast_io(teacher.eval().to(device, DTYPES[frozen_dtype]))
    adapter = adapter_for(student, sched)
    record = apply_plan(adapter, student, plan)
    student = cast_io(student.to(device))
    if checkpointing:
        student.enable_gradient_checkpointing()
    opt = _optimizer(TrainConfig(optimizer=optimizer, lr=1e-5), list(student.parameters()))
    dtype = DTYPES.get(mixed_precision)
    dev_type = torch.device(device).type
    autocast = (lambda: torch.autocast(dev_type, dtype)) if dtype not in (None, torch.float32) else nullcontext
    g = torch.Generator().manual_seed(0)
    loss = KDLoss(adapter, kd, tuple(zip(adapter.units(student), record.kept_units)))

    def step() -> None:
        x0, cond = fake_inputs(adapter, student, batch_size, res, seq, vae_scale)
        x0, cond = x0.to(device), {k: v.to(device) for k, v in cond.items()}
        loss(student, teacher, Batch(x0, cond, g, autocast))["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, res, teacher, student, opt


def measure_step(model: str, plan: Plan, batch_size: int, resolution: int | None = None, *, device: str = "cpu",
                 frozen_dtype: str = "fp32", mixed_precision: str = "no", optimizer: str = "came",
                 checkpointing: bool = False, steps: int = 3, blocks=None, **kw) -> StepResult:
    """Build the step (:func:`build_step`), run one to warm up, count one step's FLOPs, then time ``steps``."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step, res, teacher, student, opt = build_step(model, plan, batch_size, resolution, device=device,
                                                  frozen_dtype=frozen_dtype, mixed_precision=mixed_precision,
                                                  optimizer=optimizer, checkpointing=checkpointing, blocks=blocks,
                                                  **kw)
    tracker = None
    if not cuda:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(teacher, student, opt)
    def run() -> None:
        step()
        if tracker is not None:
            tracker.reset_mod_stats()  # MemTracker keeps its peak across steps only this way

    with tracker if tracker is not None else nullcontext():
        run()  # warm-up: optimizer states exist from here on
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if cuda
            else int(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]))
    dt = statistics.median(times)
    flops = int(counter.get_total_flops())
    peak_flops = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name(device)), None)
    return StepResult(model, device, batch_size, res, frozen_dtype, mixed_precision, checkpointing, optimizer, dt,
                      batch_size / dt, flops, flops / dt / 1e12, (flops / dt / peak_flops) if peak_flops else None,
                      int(peak), steps)
