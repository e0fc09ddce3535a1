"""Pure surgery: remove units, low-rank (SVD) layers, re-compression; plans that record what changed.

``slimdit.compress(model, plan, out)`` is the ``slimdit compress`` command (:func:`slimdit.compress.student.
compress_to_dir`); ``plan`` is a :class:`~slimdit.compress.plan.Plan`, its dict or a plan file.
"""

import sys
import types


def __getattr__(name: str):
    if name == "compress":  # slimdit.compress.compress(model, plan, out): the `slimdit compress` command
        from slimdit.compress.student import compress_to_dir

        return compress_to_dir
    raise AttributeError(f"module 'slimdit.compress' has no attribute {name!r}")


class _Command(types.ModuleType):
    """This package, callable as its command: importing ``slimdit.compress`` binds the package to that name, so
    ``slimdit.compress(...)`` (the Python API mirroring the CLI, DESIGN section 5) can only be the package itself."""

    def __call__(self, *args, **kwargs):
        return self.compress(*args, **kwargs)


sys.modules[__name__].__class__ = _Command
