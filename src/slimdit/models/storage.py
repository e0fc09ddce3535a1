"""Save and load students in diffusers layout.

Dense (removal-only) students are plain ``save_pretrained`` directories. Low-rank students keep the diffusers
config but store weights as ``lowrank_model.safetensors`` with ``slimdit_lowrank.json`` naming each factored
layer and its rank: plain diffusers then fails loudly (no weights file) instead of initialising the factored
layers at random; ``slimdit.load_model`` rebuilds them, and :func:`merge_lowrank` makes a dense copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from slimdit.compress.lowrank import LowRankLinear, replace_module
from slimdit.errors import TrainingDiverged
from slimdit.io import load_tensors, save_tensors, write_json

LOWRANK_INDEX = "slimdit_lowrank.json"
LOWRANK_WEIGHTS = "lowrank_model.safetensors"


def lowrank_layers(model: nn.Module) -> dict[str, dict]:
    return {name: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                   "bias": m.up.bias is not None}
            for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def check_finite(model: nn.Module, what: str) -> None:
    """Raise :class:`TrainingDiverged` naming the first parameter or buffer of ``model`` that holds a NaN or inf."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TrainingDiverged(f"refusing to save {what}: {name} is not finite (the training diverged)")


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """Save a (possibly low-rank) diffusers model; a model with non-finite weights is refused, never written."""
    out = Path(out_dir)
    check_finite(model, str(out))
    layers = lowrank_layers(model)
    if not layers:
        model.save_pretrained(out, safe_serialization=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        model.save_config(out)
        save_tensors(out / LOWRANK_WEIGHTS, model.state_dict())
        write_json(out / LOWRANK_INDEX, {"class": type(model).__name__, "layers": layers})
    drop_origin(out / "config.json")
    return out


def drop_origin(config: Path) -> None:
    """Drop diffusers' ``_name_or_path`` (where the model was last loaded from) from a saved config (a model's
    ``config.json`` or a pipeline's ``model_index.json``), so the same weights saved again are the same files: a
    run that reads this model as an input (its fingerprint) then still matches after the model's own run is rerun."""
    saved = json.loads(config.read_text())
    if saved.pop("_name_or_path", None) is not None:
        write_json(config, saved)


def _diffusers_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"unknown diffusers model class {name!r}")
    return cls


def load_model(path: str | Path, dtype=None) -> nn.Module:
    """Load a model directory written by :func:`save_model` (dense or low-rank)."""
    d = Path(path)
    if (d / "model_index.json").exists():
        raise ValueError(f"{d} is a pipeline directory; load it with slimdit.load_pipeline, or pass {d}/transformer")
    if (d / "slimdit_base.json").exists():
        raise ValueError(f"{d} is a student directory; load it with slimdit.load_pipeline, or pass {d}/transformer")
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} is not a diffusers model directory (no config.json)")
    config = json.loads((d / "config.json").read_text())
    cls = _diffusers_class(config["_class_name"])
    if not (d / LOWRANK_INDEX).exists():
        return cls.from_pretrained(d, **({"dtype": dtype} if dtype is not None else {}))
    index = json.loads((d / LOWRANK_INDEX).read_text())
    model = cls.from_config(cls.load_config(d))
    for name, spec in index["layers"].items():
        replace_module(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                                  bias=spec["bias"]))
    model.load_state_dict(load_tensors(d / LOWRANK_WEIGHTS), strict=True)
    model.eval()
    return model.to(dtype) if dtype is not None else model


def meta_model(path: str | Path) -> nn.Module:
    """The model a directory written by :func:`save_model` holds, built from its config alone on the meta device,
    its low-rank layers in place: units, parts and shapes to check a plan against, without reading any weights."""
    d = Path(path)
    if not (d / "config.json").exists():
        raise FileNotFoundError(f"{d} is not a diffusers model directory (no config.json)")
    cls = _diffusers_class(json.loads((d / "config.json").read_text())["_class_name"])
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(d))
        if (d / LOWRANK_INDEX).exists():
            for name, spec in json.loads((d / LOWRANK_INDEX).read_text())["layers"].items():
                replace_module(model, name, LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"],
                                                          bias=spec["bias"]))
    return model


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every low-rank layer by its dense product, in place."""
    for name in list(lowrank_layers(model)):
        replace_module(model, name, model.get_submodule(name).to_linear())
    return model
