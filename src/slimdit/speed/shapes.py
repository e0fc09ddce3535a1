"""The models' shapes, from their configs alone: every component of a pipeline directory, hub id or ``arch:NAME``
built on the meta device (or as fake tensors) from its ``config.json``, parameter counts, and optimizer state
bytes. Nothing is allocated and no weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn


def component_configs(model: str) -> dict[str, tuple[type, dict | object]]:
    """``component -> (class, config)`` of every model component of ``model`` (a directory, hub id or
    ``arch:NAME``), read from ``config.json`` files only."""
    from slimdit.models.arch import arch_spec, is_arch
    from slimdit.pipelines.loading import resolve_model_dir, resolve_transformer, split_model

    if is_arch(model):
        import importlib

        spec = arch_spec(model)
        out = {}
        for name, c in spec.components.items():
            if name == "scheduler":
                continue
            lib = importlib.import_module(c.module)
            out[name] = (getattr(lib, c.cls), getattr(lib, c.config_cls)(**c.config) if c.config_cls else c.config)
        return out
    pipeline, transformer = split_model(model)
    src = resolve_model_dir(pipeline)
    index = json.loads(read_model_file(src, "model_index.json"))
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] not in ("diffusers", "transformers"):
            continue
        if name == "transformer" and transformer is not None:
            t = resolve_transformer(transformer)
            text = ((t / "config.json").read_text() if isinstance(t, Path)
                    else read_model_file(t, "config.json", "transformer"))
        else:
            try:
                text = read_model_file(src, f"{name}/config.json")
            except FileNotFoundError:
                continue  # a component without a config (a tokenizer, a scheduler)
        out[name] = _class_and_config(entry[0], entry[1], json.loads(text))
    return out


def read_model_file(src: Path | str, file: str, fallback_sub: str | None = None) -> str:
    if isinstance(src, Path):
        p = src / file
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        return p.read_text()
    from huggingface_hub import hf_hub_download

    from slimdit.pipelines.loading import hub_revision

    rev = hub_revision(src)  # the cached commit runs load: an online read of main would move the cache to a newer one
    try:
        return Path(hf_hub_download(src, file, revision=rev)).read_text()
    except Exception as e:
        if fallback_sub is not None:
            return Path(hf_hub_download(src, file, subfolder=fallback_sub, revision=rev)).read_text()
        raise FileNotFoundError(f"{src}: no {file} locally or on the hub ({e})") from e


def _class_and_config(library: str, cls_name: str, config: dict):
    import importlib

    lib = importlib.import_module(library)
    cls = getattr(lib, cls_name, None)
    if cls is None:
        raise ValueError(f"unknown {library} class {cls_name!r} in the model's model_index.json")
    if library == "transformers":
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(**config)
        return cls, cfg
    return cls, {k: v for k, v in config.items() if not k.startswith("_")}


def build_component(cls, config, overrides: dict | None = None) -> nn.Module:
    """The component from its config, on the current device (meta, or fake tensors inside ``FakeTensorMode``)."""
    if isinstance(config, dict):
        return cls.from_config({**config, **(overrides or {})})
    return cls(config)


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def optimizer_bytes(model_shapes: list[tuple[int, ...]], optimizer: str) -> int:
    """fp32 optimizer state bytes: AdamW keeps two moments per parameter; CAME keeps the first moment and
    factored (row and column) second moments and residuals for matrices, two moments for vectors."""
    total = 0
    for s in model_shapes:
        n = numel(s)
        if optimizer == "adamw" or len(s) < 2:
            total += 8 * n
        else:  # CAME: exp_avg, and row/column factors of exp_avg_sq and exp_avg_res
            total += 4 * (n + 2 * s[0] + 2 * (n // s[0]))
    return total
