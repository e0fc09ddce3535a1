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

    @classmethod
    @abstractmethod
    def handles(cls, model: nn.Module) -> bool: ...

    @abstractmethod
    def part_layers(self, model: nn.Module, unit: str) -> dict[str, list[str]]:
        """Part name -> paths (relative to the unit) of the linear layers in it."""

    #: the training objective, a key of ``slimdit.distill.objectives.OBJECTIVES``
    objective: str

    @abstractmethod
    def predict(self, model: nn.Module, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        """Run the model on noisy latents at timesteps ``t`` with conditioning ``cond``; return its output."""

    def prediction(self, model: nn.Module, output: torch.Tensor) -> torch.Tensor:
        """The part of the output the objective's target is compared with (default: all of it)."""
        return output

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
    def bypassed(self, model: nn.Module, units: list[str]) -> Iterator[None]:
        """Run as if ``units`` were removed (each passes its input through), without touching the model.

        Equals :meth:`remove_units` for blocks whose output is their updated hidden states (PixArt); an
        adapter whose blocks return more overrides this.
        """
        handles = [self.unit(model, u).register_forward_hook(
            lambda _m, args, kwargs, _out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
            for u in units]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ---- features ----------------------------------------------------------------------------------------
    @contextmanager
    def capture(self, model: nn.Module, units: list[str] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Record the output hidden states of ``units`` (default: all) during forward passes inside the block."""
        feats: dict[str, torch.Tensor] = {}
        handles = []
        for u in units if units is not None else self.units(model):
            def hook(_m, _inp, out, name=u):
                feats[name] = out[0] if isinstance(out, tuple) else out
            handles.append(self.unit(model, u).register_forward_hook(hook))
        try:
            yield feats
        finally:
            for h in handles:
                h.remove()


ADAPTERS: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    ADAPTERS[cls.name] = cls
    return cls


def adapter_for(model: nn.Module, scheduler_config=None) -> Adapter:
    """Return the adapter for a model, by its class; fail with the supported list otherwise.

    With the ``scheduler_config`` of the model's pipeline, the adapter's objective follows the scheduler's
    ``prediction_type`` (a PixArt trained for v-prediction distils with a v target).
    """
    from slimdit.distill.objectives import pipeline_objective

    for cls in ADAPTERS.values():
        if cls.handles(model):
            adapter = cls()
            adapter.objective = pipeline_objective(cls.objective, scheduler_config)
            return adapter
    raise ValueError(f"no slimdit adapter for {type(model).__name__}; supported: {', '.join(ADAPTERS)}")
