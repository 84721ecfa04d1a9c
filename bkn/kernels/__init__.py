"""Which implementation runs a norm's (or a transition's) work: the backend switch ``BKN_BACKEND``.

The project's batch-statistic norms and the analytic transition exist up to three times:

* ``torch``: Python autograd Functions composed of torch ops (``bkn/layers/_function.py``,
  ``_renorm_function.py``, ``bkn/transitions/``). They run on every device and dtype and are
  the reference the other two are tested against;
* ``native``: the same Functions compiled from ``bkn/csrc/`` (C++, OpenMP), for CPU
  float32/float64 tensors (see :mod:`bkn.layers._native`);
* ``triton``: fused Triton kernels (this package's ``triton_*`` modules), for CUDA tensors;
  on CPU tensors they run in Triton's interpreter (``TRITON_INTERPRET=1``, set before the
  kernels are defined, i.e. before the first call that dispatches to them), which is how the
  tests run them on a machine without a GPU.

``BKN_BACKEND`` = ``auto`` (default) | ``native`` | ``torch`` | ``triton`` chooses. ``auto``
takes ``triton`` for CUDA tensors when triton imports, ``native`` for CPU tensors (when the
compiled kernels take them; they fall back to ``torch`` otherwise) and ``torch`` elsewhere.
A forced choice that cannot run on the given tensor is an error that says why, never a silent
fallback. ``BKN_NATIVE=0`` (older switch) keeps meaning "no compiled CPU kernels".

``python -m bkn.kernels`` builds the compiled CPU kernels up front (``__main__.py``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os

import torch

ENV_SWITCH = "BKN_BACKEND"
CHOICES = ("auto", "native", "torch", "triton")
INTERPRET_SWITCH = "TRITON_INTERPRET"


def requested() -> str:
    """The value of ``BKN_BACKEND`` (``auto`` when unset); ValueError naming the choices when it is not one."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)!r}: expected one of {', '.join(CHOICES)}")
    return value


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET`` set to 1/true/yes/on)."""
    return os.environ.get(INTERPRET_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_version() -> str | None:
    """triton's version if it imports, else None (imported once, on first use: ``import bkn`` never imports it)."""
    try:
        import triton
    except Exception:  # absent, or broken against this torch: the Triton backend is then unavailable
        return None
    return str(getattr(triton, "__version__", "unknown"))


def triton_can_run(device: torch.device) -> tuple[bool, str]:
    """(whether the Triton kernels can run on tensors of ``device``, why not)."""
    if triton_version() is None:
        return False, "triton does not import in this environment"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if interpreting():
            return True, ""
        return False, (
            f"Triton kernels run on CPU tensors only in Triton's interpreter: set {INTERPRET_SWITCH}=1 "
            "in the environment before the first call"
        )
    return False, f"the Triton kernels run on CUDA tensors (and CPU tensors in the interpreter), not {device.type}"


def backend_for(x: torch.Tensor) -> str:
    """``"native"``, ``"torch"`` or ``"triton"``: the implementation to run on ``x`` (see the module docstring).

    ``native`` means "the compiled CPU kernels if they take these tensors": their own check
    (dtype, build available) may still hand the work to ``torch``.
    """
    choice = requested()
    device = x.device
    if choice == "auto":
        if device.type == "cuda" and triton_can_run(device)[0]:
            return "triton"
        return "native" if device.type == "cpu" else "torch"
    if choice == "native" and device.type != "cpu":
        raise ValueError(
            f"{ENV_SWITCH}=native: the compiled kernels run on CPU tensors, got a {device.type} tensor "
            f"(use {ENV_SWITCH}=auto, triton or torch)"
        )
    if choice == "triton":
        ok, why = triton_can_run(device)
        if not ok:
            raise ValueError(f"{ENV_SWITCH}=triton: {why}")
    return choice


def native_module(backend: str):
    """The compiled CPU module (:func:`bkn.layers._native.load`) where ``backend`` is ``"native"``, else None.

    None also when the kernels did not build or are switched off (``BKN_NATIVE=0``); the module's own
    functions may still decline given tensors (they return an empty list), leaving them to ``torch``.
    """
    if backend != "native":
        return None
    from ..layers import _native  # on first use: importing this package loads no layer

    return _native.load()


# -- the one door of every Triton launch: counted, and invisible to dispatch modes in the interpreter --

_launch_counters: list = []


@contextlib.contextmanager
def count_launches():
    """Within the block, every Triton launch made through :func:`launch` is counted (by kernel name).

    Yields a :class:`collections.Counter`; ``sum(counter.values())`` is the number of launches.
    Blocks may nest (each counts what ran inside it).
    """
    counter: collections.Counter = collections.Counter()
    _launch_counters.append(counter)
    try:
        yield counter
    finally:
        _launch_counters.remove(counter)


def launch(kernel, grid, *args, **meta) -> None:
    """Launch the Triton ``kernel`` on ``grid``; counted by any active :func:`count_launches`.

    In the interpreter the launch copies its tensor arguments to host storages and back with
    torch ops (an artifact of interpretation, absent on a GPU); they run with the dispatch
    modes switched off, so an op counter sees a launch as a GPU would: no aten op.
    """
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", repr(kernel))
    for counter in _launch_counters:
        counter[name] += 1
    if interpreting():
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            kernel[grid](*args, **meta)
        return
    kernel[grid](*args, **meta)
