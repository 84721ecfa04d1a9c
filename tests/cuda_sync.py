"""Host syncs inside CUDA training steps made loud: ``pytest --cuda-sync-debug=error`` (or ``$BKN_CUDA_SYNC_DEBUG``).

A CUDA test wraps the step it checks (forward and backward, inputs already on the device) in
:func:`no_host_sync`. With the option (``python -m suites.gpu`` passes ``error``), that block runs
under ``torch.cuda.set_sync_debug_mode``: ``warn`` warns and ``error`` raises on every operation
that makes the host wait for the GPU (``.item()``, ``float(t)``, a blocking copy between host and
device, a stream synchronisation), which would drain the queue and rule out CUDA-graph capture.
The comparisons around the block (``.cpu()``) stay allowed. Without the option, or without a
GPU, the block runs as it is.
"""

from __future__ import annotations

import contextlib
import os

import torch

ENV = "BKN_CUDA_SYNC_DEBUG"
MODES = ("default", "warn", "error")


def mode() -> str:
    value = os.environ.get(ENV, "default").strip().lower() or "default"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@contextlib.contextmanager
def no_host_sync():
    """The block under ``torch.cuda.set_sync_debug_mode(mode())`` when a mode is asked for and CUDA is present."""
    wanted = mode()
    if wanted == "default" or not torch.cuda.is_available():
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(wanted)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
