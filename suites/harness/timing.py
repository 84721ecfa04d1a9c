"""How a benchmark process times: one case per process, asv's timing settings, synchronisation."""

from __future__ import annotations

import os

import torch

from bkn.probes.measure import CLOCKS

TIMER_ENV = "BKN_BENCH_TIMER"  # "wall" (default) or "cpu"; read once, when the suites are imported
TIMERS = CLOCKS  # wall: timeit.default_timer (time.perf_counter); cpu: time.process_time


def chosen_timer():
    """asv's timer for every family: wall-clock time, or this process's CPU time with ``$BKN_BENCH_TIMER=cpu``.

    CPU time is what ``nox -s continuous`` uses on a shared machine: a benchmark process
    that another job preempts loses wall-clock time but no CPU time, so a busy machine
    stops looking like a slowdown. It is only right for work done in the benchmark's own
    process on the CPU (one torch thread: the forward, the backward and the optimizer
    step all run in the calling thread), not for CUDA timings or the DDP step, which wait.
    """
    name = os.environ.get(TIMER_ENV, "wall")
    if name not in TIMERS:
        raise ValueError(f"{TIMER_ENV} must be one of {sorted(TIMERS)}, got {name!r}")
    return TIMERS[name]


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


def warm_up_runs(fn, device: torch.device, what: str) -> None:
    """Run ``fn`` twice before timing (allocator, kernel selection); a kernel missing for this
    dtype/device skips the case (:func:`~suites.harness.matrix.reraise_unsupported`)."""
    from .matrix import reraise_unsupported

    try:
        for _ in range(2):
            fn()
        synchronize(device)
    except RuntimeError as err:
        reraise_unsupported(err, what)


class Matrix:
    """Base of the benchmark classes: asv timing settings shared by every family.

    The quick run (``--quick``) ignores them; a full run takes up to ``repeat[1]`` samples
    of one call each (asv re-runs setup between calls), within ``repeat[2]`` seconds.
    Warm-up happens in setup (the cases' ``warm_up``), so asv's own is off.
    """

    warmup_time = 0.0
    timer = chosen_timer()
    repeat = (3, 10, 2.0)
    rounds = 2
    timeout = 300.0
