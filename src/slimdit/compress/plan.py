"""Plans: what to do to which unit, read from YAML/JSON, applied to a model with a record of what changed.

A plan file looks like::

    units:
      block.4: remove
      block.7: {svd: {mlp: 0.6, self_attn: 0.8, cross_attn: 0.8}}   # removal fraction c per part (eq. 4.9)
      block.9: {svd: 0.5}                                             # the same c for every part
      block.2: {svd: {mlp: {rank: 16}}}                               # an explicit rank
    grasp: {images: 200, batch_size: 8}   # optional: GRASP chooses which singular values the svd ops keep

Without ``grasp`` an SVD op keeps the largest singular values (eq. 4.7-4.9). With it, GRASP (thesis section 4.4.4,
:mod:`slimdit.compress.grasp`) keeps those with the largest accumulated ``|dL/ds|`` of the model's own objective
over ``images`` calibration images (thesis: 200) at timesteps drawn over the whole range, in batches of
``batch_size``. The images are ``data`` (a caption-image set: ``shapes-train:N`` or an imagefolder); ``slimdit
distill`` defaults it to the run's ``data.real``, ``slimdit compress`` needs it named. ``grasp: true`` takes the
defaults.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from slimdit.compress.lowrank import LowRankLinear, layer_shape, rank_for_ratio, replace_module
from slimdit.models.base import Adapter


@dataclass
class UnitOp:
    unit: str
    op: str  # remove | svd
    ratios: dict[str, float | dict] = field(default_factory=dict)  # part -> c, or {"rank": k}


@dataclass
class Grasp:
    """How a plan's SVD ops choose their singular values by gradient (thesis section 4.4.4)."""

    images: int = 200  # calibration images (thesis: 200)
    batch_size: int = 8
    data: str | None = None  # a caption-image set; None: the run's data.real (slimdit distill)

    @classmethod
    def from_spec(cls, spec) -> Grasp:
        if spec is True:
            return cls()
        if not isinstance(spec, dict):
            raise ValueError(f"plan grasp: expected true or {{images: N, batch_size: B, data: SET}}, got {spec!r}")
        unknown = set(spec) - {"images", "batch_size", "data"}
        if unknown:
            raise ValueError(f"plan grasp: unknown field(s) {sorted(unknown)}; allowed: images, batch_size, data")
        g = cls(**spec)
        for name in ("images", "batch_size"):
            v = getattr(g, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"plan grasp.{name}: expected a whole number >= 1, got {v!r}")
        if g.data is not None and not isinstance(g.data, str):
            raise ValueError(f"plan grasp.data: expected a caption-image set (shapes-train:N or a folder), "
                             f"got {g.data!r}")
        return g

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Plan:
    ops: list[UnitOp]
    grasp: Grasp | None = None  # None: SVD keeps the largest singular values

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if not isinstance(d, dict) or not isinstance(d.get("units"), dict):
            raise ValueError("a plan needs a mapping 'units: {unit: remove | {svd: ...}}'")
        unknown = set(d) - {"units", "grasp"}
        if unknown:
            raise ValueError(f"plan: unknown field(s) {sorted(unknown)}; allowed: units, grasp")
        ops = []
        for unit, spec in d["units"].items():
            if spec == "remove":
                ops.append(UnitOp(unit, "remove"))
            elif isinstance(spec, dict) and set(spec) == {"svd"}:
                r = spec["svd"]
                ops.append(UnitOp(unit, "svd", r if isinstance(r, dict) else {"*": r}))
            else:
                raise ValueError(f"plan units.{unit}: expected 'remove' or {{svd: ratio | {{part: ratio}}}}, "
                                 f"got {spec!r}")
        grasp = None if d.get("grasp") in (None, False) else Grasp.from_spec(d["grasp"])
        if grasp is not None and not any(o.op == "svd" for o in ops):
            raise ValueError("plan grasp: the plan has no svd op whose singular values GRASP could choose")
        return cls(ops, grasp)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"plan file {p} does not exist")
        return cls.from_dict(yaml.safe_load(p.read_text()))  # JSON is YAML

    def to_dict(self) -> dict:
        def spec(o: UnitOp):
            if o.op == "remove":
                return "remove"
            return {"svd": o.ratios["*"] if set(o.ratios) == {"*"} else o.ratios}  # as the file format writes it

        out = {"units": {o.unit: spec(o) for o in self.ops}}
        if self.grasp is not None:
            out["grasp"] = self.grasp.to_dict()
        return out


@dataclass
class LayerRecord:
    path: str  # relative to the model, in the teacher's numbering
    shape: tuple[int, int]
    rank: int


@dataclass
class UnitRecord:
    unit: str
    op: str
    params_before: int
    params_after: int
    layers: list[LayerRecord] = field(default_factory=list)


@dataclass
class PlanRecord:
    adapter: str
    block_params_before: int
    block_params_after: int
    units: list[UnitRecord]
    kept_units: list[str]  # teacher unit names, in student order

    def to_json(self) -> dict:
        return asdict(self)


def _resolve_ratios(adapter: Adapter, model: nn.Module, op: UnitOp) -> dict[str, float | dict]:
    parts = adapter.parts(model, op.unit)
    if "*" in op.ratios:
        return {p: op.ratios["*"] for p in parts}
    unknown = set(op.ratios) - set(parts)
    if unknown:
        raise ValueError(f"plan units.{op.unit}: unknown part(s) {sorted(unknown)}; allowed: {', '.join(parts)}")
    return dict(op.ratios)


def rank_for(layer: nn.Module, ratio: float) -> int:
    """The rank that removes a fraction ``ratio`` of a layer's current weights: eq. 4.9 for a dense layer; for a
    layer that is already low-rank (re-compression, section 4.6.3, where c applies to the current parameters
    P_i), ``max(1, int(r (1 - c)))``."""
    if isinstance(layer, LowRankLinear):
        return max(1, int(layer.rank * (1.0 - ratio)))
    return rank_for_ratio(*layer_shape(layer), ratio)


def _rank(spec: float | dict, layer: nn.Module, where: str) -> int | None:
    """The rank a part's spec asks for, or None when the layer stays as it is."""
    if isinstance(spec, dict):
        if set(spec) != {"rank"} or not isinstance(spec["rank"], int):
            raise ValueError(f"{where}: expected a ratio or {{rank: int}}, got {spec!r}")
        return spec["rank"]
    if not isinstance(spec, (int, float)) or not 0 <= spec < 1:
        raise ValueError(f"{where}: a ratio is a removal fraction in [0, 1), got {spec!r}")
    if spec == 0:
        return None  # no compression: the layer is untouched (bit-identical)
    return rank_for(layer, float(spec))


def validate(adapter: Adapter, model: nn.Module, plan: Plan) -> None:
    """Check every unit, part and ratio before any surgery."""
    seen = set()
    for op in plan.ops:
        adapter.unit(model, op.unit)
        if op.unit in seen:
            raise ValueError(f"plan names unit {op.unit} twice")
        seen.add(op.unit)
        if op.op == "svd":
            for part, spec in _resolve_ratios(adapter, model, op).items():
                for path, layer in adapter.layers(model, op.unit, part).items():
                    k = _rank(spec, layer, f"plan units.{op.unit}.svd.{part}")
                    if k is not None and not 1 <= k <= min(layer_shape(layer)):
                        raise ValueError(f"plan units.{op.unit}.svd.{part}: rank {k} is outside "
                                         f"[1, {min(layer_shape(layer))}] for {path}")


def svd_layers(adapter: Adapter, model: nn.Module, op: UnitOp) -> Iterator[tuple[nn.Module, str, nn.Module, int]]:
    """Yield ``(unit module, path, layer, rank)`` for every layer an SVD op factors (ratio 0 leaves a layer out)."""
    unit_mod = adapter.unit(model, op.unit)
    for part, spec in _resolve_ratios(adapter, model, op).items():
        for path, layer in adapter.layers(model, op.unit, part).items():
            k = _rank(spec, layer, f"plan units.{op.unit}.svd.{part}")
            if k is not None:
                yield unit_mod, path, layer, k


def apply_plan(adapter: Adapter, model: nn.Module, plan: Plan, keep: dict[str, torch.Tensor] | None = None
               ) -> PlanRecord:
    """Apply ``plan`` to ``model`` in place (SVD first, then removals) and return what changed.

    ``keep`` maps ``unit.path`` to the singular values to keep (GRASP); default: the largest ones.
    """
    validate(adapter, model, plan)
    before = adapter.block_params(model)
    units_before = adapter.units(model)
    records = []
    for op in plan.ops:
        p0 = adapter.unit_params(model, op.unit)
        rec = UnitRecord(op.unit, op.op, p0, 0)
        if op.op == "svd":
            for unit_mod, path, layer, k in list(svd_layers(adapter, model, op)):
                chosen = (keep or {}).get(f"{op.unit}.{path}")
                replace_module(unit_mod, path, LowRankLinear.from_linear(layer, k, keep=chosen))
                rec.layers.append(LayerRecord(f"{op.unit}.{path}", layer_shape(layer), k))
            rec.params_after = adapter.unit_params(model, op.unit)
        records.append(rec)
    removed = [o.unit for o in plan.ops if o.op == "remove"]
    adapter.remove_units(model, removed)
    return PlanRecord(adapter.name, before, adapter.block_params(model), records,
                      [u for u in units_before if u not in set(removed)])


def save_plan_record(record: PlanRecord, path: str | Path) -> None:
    Path(path).write_text(json.dumps(record.to_json(), indent=2) + "\n")


@contextmanager
def applied(adapter: Adapter, model: nn.Module, plan: Plan, keep: dict[str, torch.Tensor] | None = None
            ) -> Iterator[None]:
    """Run ``model`` as if ``plan`` were applied, then restore it exactly: SVD layers are swapped in and
    back, removed units are bypassed. Lets scorers try many plans without copying the model."""
    validate(adapter, model, plan)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for op in plan.ops:
            if op.op != "svd":
                continue
            for unit_mod, path, layer, k in list(svd_layers(adapter, model, op)):
                chosen = (keep or {}).get(f"{op.unit}.{path}")
                replace_module(unit_mod, path, LowRankLinear.from_linear(layer, k, keep=chosen))
                swaps.append((unit_mod, path, layer))
        with adapter.bypassed(model, [o.unit for o in plan.ops if o.op == "remove"]):
            yield
    finally:
        for unit_mod, path, layer in reversed(swaps):
            replace_module(unit_mod, path, layer)
