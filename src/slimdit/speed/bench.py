"""``slimdit bench --model STUDENT --vs TEACHER``.

Latency is the wall time of a full sampling call (all steps, CFG, decode) at the model's default settings;
student and teacher run alternately in one process, and the ratio is of medians, so machine noise hits both
alike. FLOPs are counted by ``torch.utils.flop_counter`` on one transformer forward; parameters are those of
the transformer.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from slimdit.pipelines.loading import load_pipeline, sampling_defaults


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
def transformer_flops(pipe, batch_size: int, max_sequence_length: int) -> int:
    """FLOPs of one transformer forward on a (2 x batch) CFG batch at the pipeline's default size."""
    tr = pipe.transformer
    c = tr.config
    size = c.sample_size
    dev, dt = tr.device, tr.dtype
    x = torch.randn(2 * batch_size, c.in_channels, size, size, device=dev, dtype=dt)
    emb_dim = pipe.text_encoder.config.d_model
    emb = torch.randn(2 * batch_size, max_sequence_length, emb_dim, device=dev, dtype=dt)
    mask = torch.ones(2 * batch_size, max_sequence_length, device=dev)
    t = torch.full((2 * batch_size,), 500, device=dev)
    counter = FlopCounterMode(display=False)
    with counter:
        tr(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
           added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return int(counter.get_total_flops())


def _sample_once(pipe, prompts: list[str], steps: int, guidance: float, max_len: int) -> float:
    sync = torch.cuda.synchronize if pipe.transformer.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=max_len,
         output_type="np", use_resolution_binning=False, clean_caption=False,
         generator=torch.Generator(pipe.transformer.device).manual_seed(0))
    sync()
    return time.perf_counter() - t0


def bench(student: str, teacher: str, repeats: int = 5, batch_size: int = 8, steps: int | None = None,
          device: str | None = None) -> BenchResult:
    """Measure the student against the teacher in one run, alternating, and return the ratios."""
    if repeats < 1 or batch_size < 1:
        raise ValueError("--repeats and --batch-size must be at least 1")
    pipes = {"student": load_pipeline(student, device), "teacher": load_pipeline(teacher, device)}
    return bench_pipelines(pipes["student"], pipes["teacher"], sampling_defaults(teacher), repeats, batch_size,
                           steps)


def bench_transformers(pipe, student, defaults: dict, repeats: int = 5, batch_size: int = 8,
                       steps: int | None = None) -> BenchResult:
    """Like :func:`bench` for a student transformer of ``pipe``'s teacher, both sampling through ``pipe``."""
    s_pipe = copy.copy(pipe)  # a shallow copy: only the transformer differs
    s_pipe.transformer = student
    return bench_pipelines(s_pipe, pipe, defaults, repeats, batch_size, steps)


def bench_pipelines(student_pipe, teacher_pipe, defaults: dict, repeats: int = 5, batch_size: int = 8,
                    steps: int | None = None) -> BenchResult:
    if repeats < 1 or batch_size < 1:
        raise ValueError("repeats and batch_size must be at least 1")
    pipes = {"student": student_pipe, "teacher": teacher_pipe}
    steps = steps or defaults.get("num_inference_steps", 20)
    guidance, max_len = defaults.get("guidance_scale", 3.5), defaults.get("max_sequence_length", 300)
    prompts = ["a red circle to the left of a blue square"] * batch_size
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
        _sample_once(p, prompts, steps, guidance, max_len)  # warm-up
    times: dict[str, list[float]] = {"student": [], "teacher": []}
    for r in range(repeats):
        order = ("student", "teacher") if r % 2 == 0 else ("teacher", "student")
        for name in order:
            times[name].append(_sample_once(pipes[name], prompts, steps, guidance, max_len))
    lat = {k: statistics.median(v) for k, v in times.items()}
    params = {k: sum(p.numel() for p in pipe.transformer.parameters()) for k, pipe in pipes.items()}
    flops = {k: transformer_flops(pipe, batch_size, max_len) for k, pipe in pipes.items()}
    return BenchResult(lat["student"] / lat["teacher"], params["student"] / params["teacher"],
                       flops["student"] / flops["teacher"], lat["student"], lat["teacher"], params["student"],
                       params["teacher"], flops["student"], flops["teacher"], repeats, batch_size, steps,
                       str(pipes["student"].transformer.device))
