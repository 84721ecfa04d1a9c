"""Run the Triton kernels in Triton's interpreter (CPU tensors) for a block, without leaking that state.

Whether ``bkn.kernels.triton_*`` modules define interpreted or compiled kernels is fixed when they
are first imported. :func:`interpreted_kernels` sets ``TRITON_INTERPRET=1`` and ``BKN_BACKEND=triton``,
imports the kernel modules afresh under them, and afterwards restores the environment and the
modules that were there before (or forgets the interpreted ones), so a later test in the same
process (e.g. the CUDA tests) gets compiled kernels.

triton's own library functions (``tl.sum``, ``tl.zeros``, ...) are jit functions too, defined
when triton is first imported: where that happened before the switch was set (another test,
``pytest.importorskip``), they are swapped for interpreted ones within the block.

The one helper for every test that runs the kernels in the interpreter (the norms' and the
analytic transition's); :func:`compile_for_gpu` runs ``tests/triton_compile.py`` (the kernels
compiled for CUDA sm_90, without the interpreter) for their slow tests.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

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


def _interpret_library(patch) -> None:
    """Swap triton's library jit functions defined without the interpreter for interpreted ones (``patch`` undoes)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for library in {tl, tl.core, tl.standard, tl.math}:
        for attr, value in list(vars(library).items()):
            if isinstance(value, JITFunction) and not isinstance(value, InterpretedFunction):
                patch.setattr(library, attr, InterpretedFunction(value.fn))


@contextlib.contextmanager
def interpreted_kernels(monkeypatch: pytest.MonkeyPatch | None = None):
    """Within the block: Triton's interpreter on, the ``triton`` backend chosen, kernel modules interpreted.

    ``monkeypatch``: a test's fixture, to record the environment changes in (so that the test's own
    later ``setenv``/``delenv`` undo in the right order); by default a private one, undone on exit.
    """
    pytest.importorskip("triton")
    import bkn.kernels as package

    before = _kernel_modules()
    attrs = {name: package.__dict__.get(name[len("bkn.kernels.") :]) for name in before}
    for name in before:  # defined without the interpreter perhaps: define them again under it
        del sys.modules[name]
        package.__dict__.pop(name[len("bkn.kernels.") :], None)
    with contextlib.nullcontext(monkeypatch) if monkeypatch is not None else pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        patch.setenv("BKN_BACKEND", "triton")
        _interpret_library(patch)
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


def compile_for_gpu(suite: str) -> str:
    """Run ``tests/triton_compile.py suite`` in a fresh process without ``TRITON_INTERPRET``; its output.

    Skips where triton or its CUDA backend is missing; fails if a kernel does not compile.
    """
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no CUDA backend")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    run = subprocess.run(
        [sys.executable, "tests/triton_compile.py", suite], cwd=root, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout
