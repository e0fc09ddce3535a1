"""Knowledge distillation: losses, feature maps, the trainer and finetuning protocols.

``slimdit.distill(config)`` is the ``slimdit distill`` command (:func:`slimdit.distill.run.run_distill`): ``config``
is a YAML file, a dict or a :class:`~slimdit.config.DistillConfig`.
"""

import sys
import types


def __getattr__(name: str):
    if name == "distill":  # slimdit.distill.distill(config): the `slimdit distill` command
        from slimdit.distill.run import run_distill

        return run_distill
    raise AttributeError(f"module 'slimdit.distill' has no attribute {name!r}")


class _Command(types.ModuleType):
    """This package, callable as its command (see :mod:`slimdit.compress` for why the package is the callable)."""

    def __call__(self, *args, **kwargs):
        return self.distill(*args, **kwargs)


sys.modules[__name__].__class__ = _Command
