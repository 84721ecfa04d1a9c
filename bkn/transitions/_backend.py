"""Which implementation runs the analytic transition's rules on given tensors (``bkn.kernels.backend_for``).

``native``: the compiled CPU kernels (``bkn/csrc/analytic_*.cpp``, which may still decline the
tensors and leave them to torch); ``torch``: the Python reference; ``triton``: the Triton
kernels (:mod:`bkn.kernels.triton_analytic_functions`, imported on first use, so that
``import bkn`` loads no triton and ``TRITON_INTERPRET`` is read when the kernels are defined).
``compiled=False`` (the rules' own switch) always means the reference.
"""

from __future__ import annotations

import torch

from .. import kernels


def backend(x: torch.Tensor, compiled: bool = True) -> str:
    """``"native"``, ``"torch"`` or ``"triton"`` for the rule on ``x`` (see the module docstring)."""
    return kernels.backend_for(x) if compiled else "torch"


def native(x: torch.Tensor, compiled: bool = True):
    """The compiled CPU module where ``x``'s backend is ``native`` (and it built), else None."""
    return kernels.native_module(backend(x, compiled))


def triton_functions():
    """:mod:`bkn.kernels.triton_analytic_functions` (imported here, on first use)."""
    from ..kernels import triton_analytic_functions

    return triton_analytic_functions
