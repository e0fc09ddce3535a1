"""slimdit: make text-to-image diffusion and flow transformers smaller and faster while keeping their quality."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_pipeline": ("slimdit.pipelines.loading", "load_pipeline"),
    "load_model": ("slimdit.models.storage", "load_model"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'slimdit' has no attribute {name!r}")
