"""Running the Triton kernels on CPU tensors in Triton's interpreter, inside one pytest process.

``TRITON_INTERPRET`` is read by ``triton.jit`` when a kernel is defined, so it must be set
before a kernel module is first imported. :func:`interpreted` sets it (through ``monkeypatch``,
undone after the test), imports the module then (lazily: other tests in the process never see
it set) and, where the module was imported earlier without it (compiled kernels, as on a
machine with a GPU), re-executes it so that its kernels are interpreted ones.

triton's own library functions (``tl.sum``, ``tl.zeros``, ...) are jit functions too, defined
when triton is first imported: where that happened before the switch was set (another test,
``pytest.importorskip``), they are swapped for interpreted ones for the test's duration.
"""

from __future__ import annotations

import importlib

import pytest


def interpreted(monkeypatch, name: str):
    """The module ``name`` with its Triton kernels running in the interpreter (skips without triton)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for library in {tl, tl.core, tl.standard, tl.math}:
        for attr, value in list(vars(library).items()):
            if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                monkeypatch.setattr(library, attr, InterpretedFunction(value.fn))
    module = importlib.import_module(name)
    kernels = [v for v in vars(module).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
    if kernels and not all(isinstance(k, InterpretedFunction) for k in kernels):
        module = importlib.reload(module)
    return module
