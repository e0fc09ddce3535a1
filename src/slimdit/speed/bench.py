"""``slimdit bench --model STUDENT --vs TEACHER``.

Latency is the wall time of a full sampling call (all steps, CFG, decode), each model at its own default
settings (a few-step student at its steps); student and teacher run alternately in one process, and the ratio is
of medians, so machine noise hits both alike. FLOPs are counted by ``torch.utils.flop_counter`` on one step's
transformer passes (two with CFG), times the steps; parameters are those of the transformer.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from slimdit.pipelines.loading import load_pipeline, sampling_defaults, sampling_options
from slimdit.pipelines.sampling import PipelineSampler, SamplingOptions


def _default_size(pipe) -> int:
    """The image size a pipeline samples at by default (diffusers' ``default_sample_size`` x the VAE's scale)."""
    size = getattr(pipe, "default_sample_size", None) or pipe.transformer.config.sample_size
    scale = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(size * scale)


@dataclass
class BenchResult:
    latency_ratio: float
    param_ratio: float
    flop_ratio: float
    student_latency_s: float
    teacher_latency_s: float
    student_params: int
    teacher_params: int
    student_flops: int
    teacher_flops: int
    repeats: int
    batch_size: int
    steps: int
    device: str

    def ratios(self) -> dict:
        return {"latency_ratio": self.latency_ratio, "param_ratio": self.param_ratio, "flop_ratio": self.flop_ratio}

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def transformer_flops(pipe, batch_size: int, options: SamplingOptions, size: int) -> int:
    """FLOPs of the transformer passes of one sampling step under ``options`` (two with CFG) for ``batch_size``
    images of ``size`` x ``size`` pixels, on the inputs the model's adapter feeds it."""
    from slimdit.models import adapter_for

    tr = pipe.transformer
    adapter = adapter_for(tr)
    max_sequence_length = options.max_sequence_length
    n = adapter.passes_per_step(tr, options) * batch_size
    dev, dt = tr.device, tr.dtype
    x = torch.randn(n, *adapter.latent_shape(pipe, size, size), device=dev, dtype=dt)
    cond = {k: v.to(dev, dt if v.is_floating_point() else v.dtype)
            for k, v in adapter.encode_prompts(pipe, ["a red circle"] * n, max_sequence_length).items()}
    t = torch.full((n,), 500, device=dev)
    counter = FlopCounterMode(display=False)
    with counter:
        adapter.predict(tr, x, t, cond)
    return int(counter.get_total_flops())


def _sample_once(pipe, prompts: list[str], options: SamplingOptions) -> float:
    sync = torch.cuda.synchronize if pipe.transformer.device.type == "cuda" else (lambda: None)
    sampler = PipelineSampler(pipe, options)
    sync()
    t0 = time.perf_counter()
    pipe(prompt=prompts, generator=torch.Generator(pipe.transformer.device).manual_seed(0), **sampler.call_kwargs())
    sync()
    return time.perf_counter() - t0


def bench(student: str, teacher: str, repeats: int = 5, batch_size: int = 8, steps: int | None = None,
          device: str | None = None) -> BenchResult:
    """Measure the student against the teacher in one run, alternating, and return the ratios."""
    if repeats < 1 or batch_size < 1:
        raise ValueError("--repeats and --batch-size must be at least 1")
    pipes = {"student": load_pipeline(student, device), "teacher": load_pipeline(teacher, device)}
    return bench_pipelines(pipes["student"], pipes["teacher"], sampling_defaults(teacher), repeats, batch_size,
                           steps, student_defaults=sampling_defaults(student))


def bench_transformers(pipe, student, defaults: dict, repeats: int = 5, batch_size: int = 8,
                       steps: int | None = None) -> BenchResult:
    """Like :func:`bench` for a student transformer of ``pipe``'s teacher, both sampling through ``pipe``."""
    s_pipe = copy.copy(pipe)  # a shallow copy: only the transformer differs
    s_pipe.transformer = student
    return bench_pipelines(s_pipe, pipe, defaults, repeats, batch_size, steps)


def bench_pipelines(student_pipe, teacher_pipe, defaults: dict, repeats: int = 5, batch_size: int = 8,
                    steps: int | None = None, student_defaults: dict | None = None) -> BenchResult:
    """Time both pipelines alternately; each samples at its own defaults (``student_defaults``: a few-step
    student's steps and guidance), unless ``steps`` sets both. FLOPs are per sampling call: one step's transformer
    passes times the steps."""
    if repeats < 1 or batch_size < 1:
        raise ValueError("repeats and batch_size must be at least 1")
    pipes = {"student": student_pipe, "teacher": teacher_pipe}
    opts = {"teacher": sampling_options(defaults, steps=steps, batch_size=batch_size),
            "student": sampling_options(student_defaults or defaults, steps=steps, batch_size=batch_size)}
    prompts = ["a red circle to the left of a blue square"] * batch_size
    for name, p in pipes.items():
        p.set_progress_bar_config(disable=True)
        _sample_once(p, prompts, opts[name])  # warm-up
    times: dict[str, list[float]] = {"student": [], "teacher": []}
    for r in range(repeats):
        order = ("student", "teacher") if r % 2 == 0 else ("teacher", "student")
        for name in order:
            times[name].append(_sample_once(pipes[name], prompts, opts[name]))
    lat = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in pipe.transformer.parameters()) for k, pipe in pipes.items()}
    size = opts["teacher"].extra.get("height") or _default_size(teacher_pipe)
    flops = {k: transformer_flops(pipe, batch_size, opts[k], size) * opts[k].num_inference_steps
             for k, pipe in pipes.items()}
    steps = opts["student"].num_inference_steps
    return BenchResult(lat["student"] / lat["teacher"], params["student"] / params["teacher"],
                       flops["student"] / flops["teacher"], lat["student"], lat["teacher"], params["student"],
                       params["teacher"], flops["student"], flops["teacher"], repeats, batch_size, steps,
                       str(pipes["student"].transformer.device))
