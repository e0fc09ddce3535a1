"""Random-weight models at the real dimensions, from configs alone (``arch:NAME`` as a MODEL): no download, for
benches and memory plans. Each adapter module registers the architectures it knows (their published configs)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

PREFIX = "arch:"


@dataclass(frozen=True)
class Component:
    """A model class by module and name, its config, and (for transformers models) its config class."""

    module: str
    cls: str
    config: dict
    config_cls: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """A real pipeline's components and how it samples."""

    name: str
    adapter: str
    components: dict[str, Component]
    resolution: int  # the default image size (pixels)
    vae_scale: int = 8  # pixels per latent pixel
    max_sequence_length: int = 300
    notes: dict = field(default_factory=dict)


ARCHS: dict[str, ArchSpec] = {}

#: T5 v1.1 XXL's encoder (PixArt-Sigma's and Flux's text encoder): 4.76 B parameters
T5_XXL = Component("transformers", "T5EncoderModel", {
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_encoder_decoder": False,
    "use_cache": False}, "T5Config")



def register_arch(spec: ArchSpec) -> ArchSpec:
    ARCHS[spec.name] = spec
    return spec


def is_arch(model: str) -> bool:
    return model.startswith(PREFIX)


def arch_spec(model: str) -> ArchSpec:
    """The spec ``arch:NAME`` names; an unknown name is an error listing the known ones."""
    import slimdit.models  # noqa: F401  (the adapters register their architectures)

    name = model[len(PREFIX):] if is_arch(model) else model
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {model!r}; known: {', '.join(PREFIX + n for n in ARCHS)}")
    return ARCHS[name]


def build_component(spec: ArchSpec, component: str, device: str | torch.device = "meta",
                    dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    """Component ``component`` of ``spec`` with random weights (on the meta device by default: shapes only)."""
    if component not in spec.components:
        raise ValueError(f"{spec.name} has no component {component!r}; it has {', '.join(spec.components)}")
    c = spec.components[component]
    lib = importlib.import_module(c.module)
    config = {**c.config, **overrides}
    with torch.device(device):
        m = getattr(lib, c.cls)(getattr(lib, c.config_cls)(**config)) if c.config_cls else getattr(lib, c.cls)(**config)
    return m.to(dtype) if dtype is not None else m


def block_overrides(spec: ArchSpec, blocks: int | dict[str, int] | None) -> dict:
    """Config overrides for a transformer cut to ``blocks`` units per group (an int: each group; a dict: per
    group, e.g. ``{"double": 2, "single": 4}``)."""
    from slimdit.models.base import ADAPTERS

    if blocks is None:
        return {}
    groups = ADAPTERS[spec.adapter].groups
    counts = {g: blocks for g in groups} if isinstance(blocks, int) else dict(blocks)
    unknown = sorted(set(counts) - set(groups))
    if unknown or any(n < 1 for n in counts.values()):
        raise ValueError(f"--blocks: expected a count >= 1 or group=N for groups {', '.join(groups)}; got {blocks}")
    return {groups[g][1]: n for g, n in counts.items()}


def parse_blocks(text: str | None) -> int | dict[str, int] | None:
    """``--blocks`` as given: ``2`` or ``double=2,single=4``."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        return {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}
    except ValueError:
        raise ValueError(f"--blocks: expected N or group=N[,group=N], got {text!r}") from None


def build_transformer(model: str, blocks: int | dict[str, int] | None = None, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """The transformer of ``arch:NAME`` with random weights (seeded), cut to ``blocks`` units per group."""
    spec = arch_spec(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_component(spec, "transformer", device, dtype, **block_overrides(spec, blocks)).eval()


def component_params(model: str) -> dict[str, int]:
    """Parameters per component of ``arch:NAME``, counted on the meta device."""
    spec = arch_spec(model)
    return {c: sum(p.numel() for p in build_component(spec, c).parameters()) for c in spec.components
            if c != "scheduler"}


def scheduler_config(model: str) -> dict:
    """The scheduler config of ``arch:NAME`` (what its training objective is read from)."""
    sched = build_component(arch_spec(model), "scheduler", device="cpu")
    return {**sched.config, "_class_name": type(sched).__name__}


def random_inputs(model: str, transformer: nn.Module, batch_size: int, resolution: int | None = None,
                  dtype: torch.dtype | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Noisy latents, timesteps and conditioning of ``arch:NAME``'s real shapes for ``batch_size`` images, as the
    adapter's ``predict`` takes them."""
    from slimdit.models import adapter_for

    spec = arch_spec(model)
    adapter = adapter_for(transformer)
    res = resolution or spec.resolution
    if res % (spec.vae_scale * 2):
        raise ValueError(f"resolution {res} must be a multiple of {spec.vae_scale * 2} for {spec.name}")
    g = torch.Generator().manual_seed(seed)
    dev = next(transformer.parameters()).device
    dt = dtype or next(transformer.parameters()).dtype
    c = adapter.latent_channels(transformer)
    x = torch.randn(batch_size, c, res // spec.vae_scale, res // spec.vae_scale, generator=g).to(dev, dt)
    cond = {k: v.to(dev, dt if v.is_floating_point() else v.dtype)
            for k, v in adapter.dummy_conditioning(transformer, batch_size, spec.max_sequence_length, g).items()}
    return x, torch.full((batch_size,), 500.0, device=dev), cond
