"""Checks of tensor values inside a training step, without a host sync on accelerators.

A check such as ``if (prior_var < 0).any(): raise`` reads a value on the host: on CUDA that
drains the GPU queue and rules out CUDA-graph capture. :func:`device_check` is the one place
the layers check tensor values: on CUDA it is ``torch._assert_async`` (the device raises,
asynchronously, with the message); on other devices (the CPU has no queue to drain) it reads
the condition and raises a ``ValueError`` with the message at once.

While a check reads its condition on the host, :func:`checking` is true (a thread-local
flag), so that :class:`bkn.probes.dispatch_count.DispatchCounter` can tell these allowed
reads from real host syncs.
"""

from __future__ import annotations

import threading

import torch

_state = threading.local()


def checking() -> bool:
    """True while :func:`device_check` reads a condition on the host in this thread."""
    return getattr(_state, "active", False)


def device_check(condition: torch.Tensor, message: str) -> None:
    """Fail with ``message`` unless every element of the tensor ``condition`` is true (non-zero).

    CUDA: ``torch._assert_async`` (no host sync; the error surfaces at the next sync).
    Elsewhere: ``ValueError(message)`` now. ``message`` should say what was wrong and what was
    expected; it cannot hold the offending values (on CUDA they are not on the host).
    """
    if condition.dim() != 0:
        condition = condition.all()
    if condition.device.type == "cuda":
        torch._assert_async(condition, message)
        return
    _state.active = True
    try:
        ok = bool(condition)
    finally:
        _state.active = False
    if not ok:
        raise ValueError(message)


def prior_var_message(label: str) -> str:
    """The error of :func:`check_prior_var` (also raised from the Triton finalize kernel's flag)."""
    return (
        f"{label}: expected a finite, non-negative prior variance in every (group, channel), "
        f"got a negative, infinite or NaN one"
    )


def check_prior_var(prior_var: torch.Tensor, label: str = "BatchKalmanNorm") -> None:
    """Every prior variance finite and >= 0 (a negative or NaN one would make the posterior NaN)."""
    device_check((prior_var >= 0).logical_and_(prior_var.isfinite()), prior_var_message(label))
