"""``slimdit bench --model arch:NAME --blocks N --plan PLAN``: a plan's student against the unmodified model at the
real dimensions, with random weights, no download.

Both are cut to the same ``blocks`` units per group and run one transformer forward on inputs of the real shapes
(latents at the architecture's resolution, a full-length caption). Latency is the median of ``repeats`` forwards,
student and teacher alternating so that machine noise hits both; FLOPs come from ``torch.utils.flop_counter``;
peak memory from ``torch.cuda.max_memory_allocated`` on a GPU and from torch's ``MemTracker`` (live tensors of
the forward, weights included) on a CPU. ``profile`` adds where each one's time goes, by operator kind.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from slimdit.compress.plan import Plan, apply_plan
from slimdit.models import adapter_for
from slimdit.models.arch import arch_spec, build_transformer, random_inputs


@dataclass
class ArchBenchResult:
    model: str
    blocks: dict
    resolution: int
    batch_size: int
    dtype: str
    device: str
    repeats: int
    latency_ratio: float
    flop_ratio: float
    param_ratio: float
    peak_memory_ratio: float
    student: dict
    teacher: dict
    profile: dict = field(default_factory=dict)

    def ratios(self) -> dict:
        return {k: getattr(self, k) for k in ("latency_ratio", "flop_ratio", "param_ratio", "peak_memory_ratio")}

    def to_json(self) -> dict:
        return asdict(self)


# operator kinds of the profile: where the time of a forward goes
KINDS = {"matmul": ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm"),
         "attention": ("scaled_dot_product", "flash", "_efficient_attention", "softmax"),
         "norm": ("layer_norm", "group_norm", "rms_norm", "native_layer_norm"),
         "activation": ("gelu", "silu", "tanh")}


def _kind(op: str) -> str:
    name = op.split("::")[-1].lstrip("_")
    if any(k in name for k in KINDS["attention"]):  # e.g. _scaled_dot_product_flash_attention_for_cpu
        return "attention"
    for kind, keys in KINDS.items():
        if any(name == k or name.startswith(k) for k in keys):
            return kind
    return "elementwise and copies"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward(adapter, model, inputs) -> torch.Tensor:
    x, t, cond = inputs
    return adapter.predict(model, x, t, cond)


def _time(adapter, model, inputs, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _forward(adapter, model, inputs)
    _sync(device)
    return time.perf_counter() - t0


def _flops(adapter, model, inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        _forward(adapter, model, inputs)
    return int(counter.get_total_flops())


def _peak_bytes(adapter, model, inputs, device) -> int:
    """Peak bytes of live tensors during one forward, the model's weights included."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _forward(adapter, model, inputs)
        return torch.cuda.max_memory_allocated(device) - base + _param_bytes(model)
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        _forward(adapter, model, inputs)
    return int(tracker.get_tracker_snapshot("peak")[device]["Total"])


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _profile(adapter, model, inputs) -> dict[str, float]:
    """Self CPU (or CUDA) time per operator kind of one forward, in milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        _forward(adapter, model, inputs)
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        us = e.self_device_time_total if torch.cuda.is_available() else e.self_cpu_time_total
        out[_kind(e.key)] += us / 1000
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def bench_arch(model: str, plan: Plan, blocks=None, resolution: int | None = None, batch_size: int = 1,
               repeats: int = 5, dtype: torch.dtype = torch.float32, device: str | None = None,
               profile: bool = False) -> ArchBenchResult:
    """The plan's student against the unmodified ``arch:NAME`` model cut to ``blocks``, side by side."""
    if repeats < 1 or batch_size < 1:
        raise ValueError("--repeats and --batch-size must be at least 1")
    spec = arch_spec(model)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = build_transformer(model, blocks, "cpu", torch.float32)
    adapter = adapter_for(teacher)
    from slimdit.compress.plan import validate

    validate(adapter, teacher, plan)  # unit and part names, before the SVD work
    student = copy.deepcopy(teacher)
    record = apply_plan(adapter, student, plan)  # SVD in float32 whatever the bench dtype
    models = {"student": student.to(dev, dtype), "teacher": teacher.to(dev, dtype)}
    inputs = random_inputs(model, models["teacher"], batch_size, resolution, dtype)
    for m in models.values():
        _time(adapter, m, inputs, dev)  # warm-up
    times: dict[str, list[float]] = {"student": [], "teacher": []}
    for r in range(repeats):
        for name in (("student", "teacher") if r % 2 == 0 else ("teacher", "student")):
            times[name].append(_time(adapter, models[name], inputs, dev))
    stats = {}
    for name, m in models.items():
        stats[name] = {"latency_s": statistics.median(times[name]), "flops": _flops(adapter, m, inputs),
                       "params": sum(p.numel() for p in m.parameters()),
                       "block_params": adapter.block_params(m), "peak_bytes": _peak_bytes(adapter, m, inputs, dev)}
    prof = {name: _profile(adapter, m, inputs) for name, m in models.items()} if profile else {}
    s, t = stats["student"], stats["teacher"]
    return ArchBenchResult(
        model=f"arch:{spec.name}", blocks={g: len(getattr(teacher, a)) for g, (a, _) in adapter.groups.items()},
        resolution=resolution or spec.resolution, batch_size=batch_size, dtype=str(dtype).replace("torch.", ""),
        device=str(dev), repeats=repeats, latency_ratio=s["latency_s"] / t["latency_s"],
        flop_ratio=s["flops"] / t["flops"], param_ratio=s["params"] / t["params"],
        peak_memory_ratio=s["peak_bytes"] / t["peak_bytes"],
        student={**s, "block_param_ratio": record.block_params_after / record.block_params_before}, teacher=t,
        profile=prof)
