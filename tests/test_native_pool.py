"""The compiled kernels' memory pool (``bkn/csrc/_native_pool.cpp``): the analytic transition's
weight gradients and tap sums come from freed blocks, which are reused only once released."""

from __future__ import annotations

import os

import pytest
import torch

from bkn.layers import _native
from bkn.transitions.analytic import conv_moments


def _module_or_skip():
    module = _native.load()
    if module is None:
        pytest.skip("the compiled kernels are not available")
    return module


def _weight_grad(w, mean, var):
    w = w.detach().clone().requires_grad_()
    out_mean, out_var = conv_moments(w, mean, var)
    (grad,) = torch.autograd.grad(out_mean.sum() + out_var.sum(), w)
    return grad


def test_freed_weight_gradients_are_reused_and_live_ones_never_shared():
    module = _module_or_skip()
    _native.release_cached()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 16, 3, 3, generator=gen)
    mean, var = torch.randn(2, 16, generator=gen), torch.rand(2, 16, generator=gen)
    first = _weight_grad(w, mean, var)
    expect = first.clone()
    second = _weight_grad(w, mean, var)  # `first` is alive: its memory is not handed out again
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, expect)
    held = _native.cached_bytes()
    address = second.data_ptr()
    del second
    assert _native.cached_bytes() >= held + w.numel() * w.element_size()
    third = _weight_grad(w, mean, var)  # same size: a freed block comes back
    assert third.data_ptr() == address
    torch.testing.assert_close(third, expect)
    # An ordinary CPU tensor: resizable, and freeing the cache leaves tensors in use alone.
    assert _native.release_cached() > 0 and module.pool_cached_bytes() == 0
    third.resize_(1000)
    third.fill_(1.0)
    assert third.sum().item() == 1000.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_its_own_pool():
    _module_or_skip()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=gen)
    mean, var = torch.randn(1, 4, generator=gen), torch.rand(1, 4, generator=gen)
    keep = _weight_grad(w, mean, var)
    pid = os.fork()
    if pid == 0:  # the child: allocate, free and reuse from an empty pool, then leave at once
        try:
            ok = _native.cached_bytes() == 0
            grad = _weight_grad(w, mean, var)
            ok = ok and torch.equal(grad, keep)
            del grad
            ok = ok and _native.cached_bytes() > 0
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
