"""Samplers: one contract for every model, ``generate(prompts, seeds) -> uint8 (N, H, W, 3)``.

Image i depends only on (prompt i, seed i), never on how prompts are batched.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm


class Sampler(Protocol):
    name: str

    def generate(self, prompts: list[str], seeds: list[int], progress: bool = True) -> np.ndarray: ...


@dataclass
class SamplingOptions:
    num_inference_steps: int = 20
    guidance_scale: float = 3.5
    max_sequence_length: int = 300
    batch_size: int = 64
    extra: dict = field(default_factory=dict)


class PipelineSampler:
    """Sample from a diffusers text-to-image pipeline with classifier-free guidance and per-image seeds."""

    def __init__(self, pipe, options: SamplingOptions, name: str = "pipeline"):
        self.pipe = pipe
        self.options = options
        self.name = name
        pipe.set_progress_bar_config(disable=True)

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def call_kwargs(self, output_type: str = "np") -> dict:
        """The keyword arguments this sampler calls its pipeline with (besides prompts and generators)."""
        kw = dict(num_inference_steps=self.options.num_inference_steps, guidance_scale=self.options.guidance_scale,
                  max_sequence_length=self.options.max_sequence_length, output_type=output_type, **self.options.extra)
        from slimdit.models import adapter_for

        params = _call_params(self.pipe)
        for k, v in adapter_for(self.pipe.transformer).call_defaults.items():  # the architecture's pipeline knobs
            if k in params:
                kw.setdefault(k, v)
        return kw

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], progress: bool = True) -> np.ndarray:
        if len(prompts) != len(seeds):
            raise ValueError(f"need one seed per prompt, got {len(prompts)} prompts and {len(seeds)} seeds")
        out = []
        bs = self.options.batch_size
        for i in tqdm(range(0, len(prompts), bs), desc=f"sampling {self.name}", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            gens = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds[i:i + bs]]
            with step_generators(self.pipe.scheduler, gens):
                imgs = self.pipe(prompt=list(prompts[i:i + bs]), generator=gens, **self.call_kwargs()).images
            out.append(np.clip(np.rint(np.asarray(imgs) * 255), 0, 255).astype(np.uint8))
        return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


@contextmanager
def step_generators(scheduler, generators: list[torch.Generator]):
    """While open, a scheduler whose step draws noise (``LCMScheduler``, ``FlowMatchLCMScheduler``: a consistency
    student's, which noises each clean estimate again) draws image i's from ``generators[i]``, also where the
    pipeline does not pass its generator to the step (``FluxPipeline``), so the image still depends on its seed
    alone."""
    import inspect

    step = scheduler.step
    if "generator" not in inspect.signature(step).parameters:
        yield
        return

    @functools.wraps(step)  # keeps step's signature: pipelines read it to choose what to pass (eta, generator)
    def seeded(*args, **kwargs):
        if kwargs.get("generator") is None:
            kwargs["generator"] = generators
        return step(*args, **kwargs)

    had, before = "step" in vars(scheduler), vars(scheduler).get("step")
    scheduler.step = seeded
    try:
        yield
    finally:
        if had:
            scheduler.step = before
        else:
            del scheduler.step  # the class's own again


def _call_params(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)
