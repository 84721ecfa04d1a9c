"""Run the Triton kernels in Triton's interpreter (CPU tensors) for a block, without leaking that state.

Whether ``bkn.kernels.triton_*`` modules define interpreted or compiled kernels is fixed when they
are first imported. :func:`interpreted_kernels` sets ``TRITON_INTERPRET=1`` and ``BKN_BACKEND=triton``,
imports the kernel modules afresh under them, and afterwards restores the environment and the
modules that were there before (or forgets the interpreted ones), so a later test in the same
process (e.g. the CUDA tests) gets compiled kernels.
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

PREFIX = "bkn.kernels.triton_"


@contextlib.contextmanager
def backend(name: str):
    """``BKN_BACKEND=name`` within the block."""
    saved = os.environ.get("BKN_BACKEND")
    os.environ["BKN_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("BKN_BACKEND", None)
        else:
            os.environ["BKN_BACKEND"] = saved


def _kernel_modules() -> dict:
    return {name: module for name, module in sys.modules.items() if name.startswith(PREFIX)}


@contextlib.contextmanager
def interpreted_kernels():
    """Within the block: Triton's interpreter on, the ``triton`` backend chosen, kernel modules interpreted."""
    pytest.importorskip("triton")
    import bkn.kernels as package

    before = _kernel_modules()
    attrs = {name: package.__dict__.get(name[len("bkn.kernels.") :]) for name in before}
    for name in before:  # defined without the interpreter perhaps: define them again under it
        del sys.modules[name]
        package.__dict__.pop(name[len("bkn.kernels.") :], None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setenv("BKN_BACKEND", "triton")
        try:
            yield
        finally:
            for name in _kernel_modules():
                del sys.modules[name]
                package.__dict__.pop(name[len("bkn.kernels.") :], None)
            for name, module in before.items():
                sys.modules[name] = module
                if attrs[name] is not None:
                    setattr(package, name[len("bkn.kernels.") :], attrs[name])
