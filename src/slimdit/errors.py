"""Errors that end a command with a one-line message instead of a traceback (``slimdit.cli`` catches them)."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run that cannot go on: it stopped on purpose, with what was written so far kept intact."""


class TrainingDiverged(RunError):
    """A non-finite loss or gradient: the run stopped before anything non-finite was saved."""


class OutputError(RunError):
    """An output path that cannot be written. ``payload``, if set, is what could not be written (e.g. metrics),
    so the caller can still show it."""

    def __init__(self, message: str, payload=None):
        super().__init__(message)
        self.payload = payload
