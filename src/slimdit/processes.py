"""The processes of a launch (``accelerate launch``, torchrun), made once with slimdit's settings.

Every command asks :func:`process_state` rather than building accelerate's ``PartialState`` itself, so that the
first caller (whichever it is) sets the process group up the same way: over gloo on a CPU-only machine, and with a
barrier timeout long enough for the main process to cache a large data set or generate a synthetic set while the
others wait to read it (torch's default gives up after 10 minutes on NCCL)."""

from __future__ import annotations

from datetime import timedelta

import torch

#: how long one process waits at a barrier for the others
BARRIER_TIMEOUT = timedelta(hours=6)


def process_state():
    """accelerate's ``PartialState`` of this launch (a single process when not launched)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
