"""slimdit: make text-to-image diffusion and flow transformers smaller and faster while keeping their quality."""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    # the Python API mirrors the CLI; imports are lazy so that `import slimdit` stays cheap. compress and distill
    # are subpackages that are callable as their commands: slimdit.compress(model, plan, out) and
    # slimdit.distill(config) (also slimdit.compress.compress and slimdit.distill.distill)
    "load_pipeline": ("slimdit.pipelines.loading", "load_pipeline"),
    "load_model": ("slimdit.models.storage", "load_model"),
    "analyze": ("slimdit.importance.analyze", "analyze"),
    "run": ("slimdit.schedules.run", "run_schedule"),
    "evaluate": ("slimdit.metrics.evaluate", "evaluate_model"),
    "bench": ("slimdit.speed.bench", "bench"),
}


_COMMAND_PACKAGES = ("compress", "distill")


def __getattr__(name: str):
    import importlib

    if name in _COMMAND_PACKAGES:  # importing a subpackage binds it here; the packages themselves are callable
        return importlib.import_module(f"slimdit.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'slimdit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_COMMAND_PACKAGES})
