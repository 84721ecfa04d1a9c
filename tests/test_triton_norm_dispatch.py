"""A training step of every registry method on the Triton backend: no host sync, launches per norm layer counted.

Runs :func:`bkn.probes.dispatch_count.measure_method` with ``backend_name="triton"`` on CPU tensors in
Triton's interpreter (:mod:`triton_interpreter`). The grouped norms of the small net (ghost batches
of 2) then run the Triton kernels: 3 launches forward and 3 backward per layer (2 forward where a
layer is given its observed moments, as BKN with the adaptive gain). Also the backend switch of
the dispatch: ``torch`` skips the compiled CPU kernels, ``native`` takes them.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from triton_interpreter import backend, interpreted_kernels

import bkn.methods
from bkn import kernels
from bkn.layers import _native
from bkn.layers._function import normalize_with_stats
from bkn.probes.dispatch_count import measure_method, single_process_group

pytest.importorskip("triton")


def _grouped(name: str) -> bool:
    """Whether the method's norms take the grouped-statistics path (the Triton kernels) in the small net."""
    return name in ("bn", "brn", "brn-scheduled") or name.startswith("bkn-")


def _measure(name: str, batch: int = 8) -> dict:
    with single_process_group() if name == "syncbn" else contextlib.nullcontext():
        with interpreted_kernels():
            result = measure_method(name, batch=batch, backend_name="triton", stacks=True)
        result["before"] = measure_method(name, batch=batch, backend_name="torch")  # the Python Functions
    return result


@pytest.mark.slow
def test_ghost_bn_step_on_triton():
    """A batch of 4 in ghost batches of 2 (~9 s: the interpreter runs every program in Python; the default run's
    fast equivalent is tests/test_triton_norm.py::test_no_host_sync_and_six_launches)."""
    result = _measure("bn", batch=4)
    assert result["syncs"] == 0, "\n\n".join(result["where"])
    assert result["launches_per_norm"] == 6  # partial moments, finalize, normalize; partial sums, coefficients, dx
    assert result["per_norm"] < result["before"]["per_norm"] / 2, (result["per_norm"], result["before"]["per_norm"])


@pytest.mark.slow
@pytest.mark.parametrize("name", bkn.methods.names())
def test_every_method_step_on_triton_has_no_host_sync(name):
    result = _measure(name)
    assert result["syncs"] == 0, f"{name}: host syncs:\n" + "\n\n".join(result["where"])
    if _grouped(name):
        transition = 2 if name.startswith("bkn-analytic") else 0  # its 4 Triton launches per prior, 1 prior in 2
        assert 5 <= result["launches_per_norm"] <= 6 + transition, result
        assert result["per_norm"] < result["before"]["per_norm"], result
    else:
        assert result["launches_per_norm"] == 0, result
    # the targets (the methods it names): kernel ops (no views, no allocations) + Triton launches per norm
    target = {"bn": 8, "brn": 8, "brn-scheduled": 8, "bkn-analytic": 16, "bkn-official": 24}.get(name)
    if target is not None:
        assert result["kernel_launches_per_norm"] <= target, result


def test_backend_torch_skips_the_compiled_kernels(monkeypatch):
    """``BKN_BACKEND=torch`` never asks for the compiled kernels; ``native`` does (and they may decline)."""
    asked = []

    def load():
        asked.append(True)
        return None

    monkeypatch.setattr(_native, "load", load)
    x = torch.randn(4, 3, 2, 2)
    with backend("torch"):
        normalize_with_stats(x, None, None, groups=2)
    assert asked == []
    with backend("native"):
        normalize_with_stats(x, None, None, groups=2)
    assert asked == [True]


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(kernels.INTERPRET_SWITCH, raising=False)
    with backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        normalize_with_stats(torch.randn(4, 3, 2, 2), None, None, groups=2)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        measure_method("bn", backend_name="triton")
