"""The adapter interface: units, parts, parameter counts, unit removal and per-unit output features."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn


class Adapter(ABC):
    """Architecture knowledge in one place. Units are named ``<group>.<index>`` (``block.3``, ``double.0``)."""

    name: str
    #: group prefix -> (attribute holding the nn.ModuleList, config key holding its length)
    groups: dict[str, tuple[str, str]]

    #: diffusers pipeline classes whose transformer this adapter handles, and their default sampling settings
    pipelines: tuple[str, ...] = ()
    sampling: dict = {}
    #: keyword arguments the architecture's pipeline is always called with (unless a sampler sets them)
    call_defaults: dict = {}
    #: the streams a unit reads and writes, the image stream first (Flux blocks also carry the text stream)
    streams: tuple[str, ...] = ("image",)
    #: the objective (``slimdit.distill.objectives``) read from the pipeline's scheduler config by ``adapter_for``
    _objective = None

    @classmethod
    @abstractmethod
    def handles(cls, model: nn.Module) -> bool: ...

    @abstractmethod
    def part_layers(self, model: nn.Module, unit: str) -> dict[str, list[str]]:
        """Part name -> paths (relative to the unit) of the linear layers in it."""

    @property
    def objective(self):
        if self._objective is None:
            raise ValueError(f"the {self.name} adapter was made without its pipeline's scheduler config, so its "
                             "training objective is unknown; use adapter_for(model, pipe.scheduler.config)")
        return self._objective

    @abstractmethod
    def predict(self, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """Run the model on noisy latents ``(B, C, H, W)`` at scheduler timesteps ``t`` with conditioning ``cond``
        (the dict :meth:`encode_prompts` makes); return its output in the latents' layout."""

    def prediction(self, model: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """The part of the output the objective's target is compared with (default: all of it)."""
        return output

    def image_tokens(self, model: nn.Module, latents: torch.Tensor) -> int:
        """How many image tokens the model sees for ``latents`` (a flow objective's dynamic shift depends on it)."""
        p = getattr(model.config, "patch_size", 1) or 1
        return (latents.shape[-2] // p) * (latents.shape[-1] // p)

    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of the clean latents of a ``height`` x ``width`` image through ``pipe``'s VAE."""
        vae = pipe.vae.config
        scale = 2 ** (len(getattr(vae, "block_out_channels", [0])) - 1)
        return getattr(vae, "latent_channels", 3), height // scale, width // scale

    def passes_per_step(self, model: nn.Module, options) -> int:
        """Transformer passes per sampling step under sampling ``options``: 2 with classifier-free guidance."""
        return 2 if options.guidance_scale > 1 else 1

    def takes_guidance(self, model: nn.Module) -> bool:
        """Whether the model takes a guidance scale as an input (``cond["guidance"]``): a guidance-distilled model."""
        return False

    def guidance_scale(self, model: nn.Module, defaults: dict) -> float:
        """The guidance ``model`` samples with under its sampling ``defaults``: its CFG scale (1: none), or the
        scale a guidance-distilled model takes as an input."""
        return float(defaults["guidance_scale"])

    def guided_sampling(self, model: nn.Module, guidance: float) -> dict:
        """The sampling defaults' overrides that make ``model``'s pipeline sample at ``guidance`` (1: no CFG, one
        pass per step), as :meth:`guidance_scale` reads them back."""
        return {"guidance_scale": guidance}

    def latent_channels(self, model: nn.Module) -> int:
        """Channels of the clean latents the model denoises."""
        return unwrap(model).config.in_channels

    @abstractmethod
    def dummy_conditioning(self, model: nn.Module, n: int, max_sequence_length: int,
                           generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random conditioning of the shapes :meth:`encode_prompts` gives for ``n`` captions, without text encoders
        (benches and memory measurements at real dimensions)."""

    @abstractmethod
    def encode_prompts(self, pipe, captions: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
        """The text conditioning of ``captions`` through ``pipe``'s own encoders: a dict of ``(N, ...)`` tensors,
        what :meth:`predict` takes as ``cond`` (the empty caption gives the dropped, null form)."""

    # ---- unit I/O: which streams a unit reads and writes --------------------------------------------------
    def unit_inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """A unit's input streams, from the arguments of its forward call."""
        return {"image": args[0] if args else kwargs["hidden_states"]}

    def unit_outputs(self, out) -> dict[str, torch.Tensor]:
        """A unit's output streams, from what its forward returned."""
        return {"image": out[0] if isinstance(out, tuple) else out}

    def unit_result(self, streams: dict[str, torch.Tensor]):
        """``streams`` packed as the unit's forward returns them (for hooks that replace a unit's output)."""
        return streams["image"]

    # ---- units -------------------------------------------------------------------------------------------
    def _split(self, unit: str) -> tuple[str, int]:
        group, _, idx = unit.partition(".")
        if group not in self.groups or not idx.isdigit():
            raise ValueError(f"bad unit name {unit!r} for {self.name}; expected one of "
                             f"{', '.join(g + '.N' for g in self.groups)}")
        return group, int(idx)

    def units(self, model: nn.Module) -> list[str]:
        return [f"{g}.{i}" for g, (attr, _) in self.groups.items() for i in range(len(getattr(model, attr)))]

    def unit(self, model: nn.Module, unit: str) -> nn.Module:
        group, idx = self._split(unit)
        blocks = getattr(model, self.groups[group][0])
        if idx >= len(blocks):
            raise ValueError(f"unit {unit!r} does not exist: the model has {len(blocks)} {group} units")
        return blocks[idx]

    def parts(self, model: nn.Module, unit: str) -> list[str]:
        return list(self.part_layers(model, unit))

    def layers(self, model: nn.Module, unit: str, part: str) -> dict[str, nn.Module]:
        """Path (relative to the unit) -> linear (or low-rank) layer, for one part."""
        table = self.part_layers(model, unit)
        if part not in table:
            raise ValueError(f"unknown part {part!r} of {unit}; allowed: {', '.join(table)}")
        mod = self.unit(model, unit)
        return {path: mod.get_submodule(path) for path in table[part]}

    # ---- counting ----------------------------------------------------------------------------------------
    def unit_params(self, model: nn.Module, unit: str) -> int:
        return sum(p.numel() for p in self.unit(model, unit).parameters())

    def block_params(self, model: nn.Module) -> int:
        """Parameters in all units together (what compression targets)."""
        return sum(self.unit_params(model, u) for u in self.units(model))

    # ---- surgery -----------------------------------------------------------------------------------------
    def remove_units(self, model: nn.Module, units: list[str]) -> None:
        """Delete units from their ModuleLists and update the config, so diffusers can reload the model."""
        by_group: dict[str, list[int]] = {}
        for u in units:
            self.unit(model, u)  # validates
            g, i = self._split(u)
            by_group.setdefault(g, []).append(i)
        for g, idxs in by_group.items():
            attr, key = self.groups[g]
            blocks = getattr(model, attr)
            keep = [b for i, b in enumerate(blocks) if i not in set(idxs)]
            setattr(model, attr, nn.ModuleList(keep))
            model.register_to_config(**{key: len(keep)})

    @contextmanager
    def hooked(self, model: nn.Module, units: list[str], fn) -> Iterator[None]:
        """Call ``fn(unit, inputs, outputs)`` (stream dicts) after each forward of ``units``; a dict it returns
        replaces the unit's output streams."""
        def hook(_m, args, kwargs, out, name):
            new = fn(name, self.unit_inputs(args, kwargs), self.unit_outputs(out))
            return None if new is None else self.unit_result(new)

        handles = [self.unit(model, u).register_forward_hook(
            lambda m, a, k, o, name=u: hook(m, a, k, o, name), with_kwargs=True) for u in units]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def bypassed(self, model: nn.Module, units: list[str]):
        """Run as if ``units`` were removed (each passes every input stream through), without touching the model;
        equals :meth:`remove_units`."""
        return self.hooked(model, units, lambda _u, inputs, _outputs: inputs)

    # ---- features ----------------------------------------------------------------------------------------
    @contextmanager
    def capture(self, model: nn.Module, units: list[str] | None = None
                ) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        """Record the output streams of ``units`` (default: all), ``{unit: {stream: tensor}}``, during forward
        passes inside the block."""
        feats: dict[str, dict[str, torch.Tensor]] = {}

        def record(unit, _inputs, outputs):
            feats[unit] = outputs

        with self.hooked(model, units if units is not None else self.units(model), record):
            yield feats

    def features(self, feats: dict[str, dict[str, torch.Tensor]], units: list[str],
                 streams: tuple[str, ...] | None = None) -> list[torch.Tensor]:
        """The captured features of ``units`` as the list feature KD compares, every stream (or those given) of
        every unit in order: each (unit, stream) is one feature l of eq. 4.11-4.14, normalised on its own."""
        return [feats[u][s] for u in units for s in streams or self.streams]


def unwrap(model: nn.Module) -> nn.Module:
    """The model a distributed wrapper (DDP) holds, whose ``config`` and modules the adapter reads."""
    return getattr(model, "module", model)


ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.name] = cls
    return cls


def adapter_for(model: nn.Module, scheduler_config=None) -> Adapter:
    """Return the adapter for a model, by its class; fail with the supported list otherwise.

    With the ``scheduler_config`` of the model's pipeline, the adapter carries the objective that config implies
    (DDPM epsilon or v with its betas, or rectified flow); without one, asking for the objective is an error.
    """
    from slimdit.distill.objectives import objective_for

    for cls in ADAPTERS.values():
        if cls.handles(model):
            adapter = cls()
            if scheduler_config is not None:
                adapter._objective = objective_for(scheduler_config)
            return adapter
    raise ValueError(f"no slimdit adapter for {type(model).__name__}; supported: {', '.join(ADAPTERS)}")
