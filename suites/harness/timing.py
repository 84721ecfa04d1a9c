"""How a benchmark process times: one case per process, asv's timing settings, synchronisation."""

from __future__ import annotations

import torch

_last_case: tuple[tuple, object] | None = None


def cached(key: tuple, build):
    """``build()`` once per key: asv re-runs setup before every timed sample (asv#966), and a
    case (tensors, layers, warm-up) is the same each time. Only the last case is kept."""
    global _last_case
    if _last_case is not None and _last_case[0] == key:
        return _last_case[1]
    _last_case = None  # free the previous case before building the next
    value = build()
    _last_case = (key, value)
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device: a CUDA timing must include the kernels, not just their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Matrix:
    """Base of the benchmark classes: asv timing settings shared by every family.

    The quick run (``--quick``) ignores them; a full run takes up to ``repeat[1]`` samples
    of one call each (asv re-runs setup between calls), within ``repeat[2]`` seconds.
    Warm-up happens in setup (the cases' ``warm_up``), so asv's own is off.
    """

    warmup_time = 0.0
    repeat = (3, 10, 2.0)
    rounds = 2
    timeout = 300.0
