"""The core's registries, which worlds fill: built-in models, samplers, benchmarks, embedders, rewards, dataset
specs and CLI commands.

A world is a plugin: a zero-argument function published under the entry-point group ``slimdit.worlds`` that
writes its names into these dicts. The core reads the dicts and never imports a world; the first read of any
registry loads every world once.
"""

from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "slimdit.worlds"
_loaded = False


def load_worlds() -> None:
    """Call every ``slimdit.worlds`` entry point, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # before the calls: a world may read a registry while it registers
    import slimdit.metrics  # noqa: F401  (the core's own benchmarks register when it is imported)

    try:
        for ep in entry_points(group=GROUP):
            ep.load()()
    except Exception:
        _loaded = False  # a broken world fails every read, not just the first
        raise


class Registry(dict):
    """A dict whose reads first load the worlds, so that their names are there when anyone looks."""

    def __getitem__(self, key):
        load_worlds()
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        load_worlds()
        return super().__contains__(key)

    def __iter__(self):
        load_worlds()
        return super().__iter__()

    def __len__(self) -> int:
        load_worlds()
        return super().__len__()

    def get(self, key, default=None):
        load_worlds()
        return super().get(key, default)

    def keys(self):
        load_worlds()
        return super().keys()

    def items(self):
        load_worlds()
        return super().items()

    def values(self):
        load_worlds()
        return super().values()


MODELS = Registry()  # built-in name -> () -> pipeline directory (Path)
SAMPLERS = Registry()  # name -> () -> Sampler, for models without a pipeline (a ground-truth renderer)
BENCHMARKS = Registry()  # name -> slimdit.metrics.benchmarks.Benchmark
EMBEDDERS = Registry()  # name -> () -> Embedder
# name -> () -> reward, ``(captions, uint8 images (N, H, W, 3)) -> (N,) floats``, higher is better (reward tuning)
REWARDS = Registry()
# name -> () -> differentiable reward, ``(captions, images (N, 3, H, W) in [-1, 1]) -> (N,) tensor`` (direct reward
# fine-tuning backpropagates through it)
DIFFERENTIABLE_REWARDS = Registry()
DATASETS = Registry()  # spec prefix -> (full spec "prefix:...") -> slimdit.data.datasets.CaptionImages
COMMANDS = Registry()  # name -> (argparse subparsers) -> None, adding the world's subcommands
# diffusers component class -> the module defining it; imported only before a pipeline loads, since diffusers can
# build a pipeline's custom component only once its module is imported (and importing diffusers is slow)
COMPONENTS = Registry()


def is_spec(value: str) -> bool:
    """Whether ``value`` is a registered dataset spec: ``prefix:...`` with ``prefix`` in :data:`DATASETS`."""
    prefix, colon, _ = value.partition(":")
    return bool(colon) and prefix in DATASETS


def spec_forms() -> str:
    """The registered dataset specs, for error messages: ``shapes-train:N`` (a spec's first field is its size)."""
    return " or ".join(f"{p}:N" for p in DATASETS) or "a registered dataset spec (none is registered)"
