"""Adapters: what a unit (block) and a part are for each architecture. Nothing else touches model internals."""

from slimdit.models import flux, pixart  # noqa: F401  (registers the adapters)
from slimdit.models.base import ADAPTERS, Adapter, adapter_for

__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
