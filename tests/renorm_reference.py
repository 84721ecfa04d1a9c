"""Shared by the Batch Renormalization tests (tests/test_renorm*.py): the choice of path (the
compiled kernels or the torch Functions; conftest's ``path`` fixture uses it), input shapes,
random layer state, and the numpy and torch references of docs/design.md §6."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from bkn.layers import _native
from bkn.layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

CLASSES = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


PATHS = ("compiled", "torch")


@contextlib.contextmanager
def use_path(name: str):
    """``compiled`` (bkn/csrc/_renorm_function.cpp, the default on the CPU) or ``torch`` (the Python
    autograd Functions: the reference, the path on GPUs and the fallback)."""
    load = _native.load
    if name == "compiled" and load() is None:
        pytest.skip("the compiled kernels are off (BKN_NATIVE=0) or could not be built")
    if name != "compiled":
        _native.load = lambda: None
    try:
        yield name
    finally:
        _native.load = load


def batch_shape(spatial: int, n: int = 4, c: int = 3) -> tuple[int, ...]:
    return (n, c) + {0: (), 1: (5,), 2: (3, 4), 3: (2, 3, 2)}[spatial]


def randomize(layer, seed: int = 0, mean_scale: float = 1.0, std_range=(0.5, 2.0)) -> None:
    """Random affine parameters and running estimates (running_var kept consistent)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(layer.num_features, generator=gen) * 1.5 + 0.25)
            layer.bias.copy_(torch.randn(layer.num_features, generator=gen))
        if getattr(layer, "running_std", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen) * mean_scale)
            lo, hi = std_range
            layer.running_std.copy_(lo + (hi - lo) * torch.rand(layer.num_features, generator=gen))
            layer.sync_running_var()


# -- numpy and torch references ------------------------------------------------------------


def reference_step(x, w, b, mu, sigma, rmax, dmax, eps, momentum, groups):
    """Spec 2 in float64 numpy: output, new mu, new sigma, r, d, m_o, sigma_B for (G, C)."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    m = xg.mean(axis=(1, 3))
    v = xg.var(axis=(1, 3))
    sb = np.sqrt(v + eps)
    r = np.clip(sb / sigma, 1 / rmax, rmax)
    d = np.clip((m - mu) / sigma, -dmax, dmax)
    per = lambda a: a[:, None, :, None]  # noqa: E731
    y = ((xg - per(m)) / per(sb) * per(r) + per(d)) * w[None, None, :, None] + b[None, None, :, None]
    new_mu = mu + momentum * (m.mean(0) - mu)
    new_sigma = sigma + momentum * (sb.mean(0) - sigma)
    return y.reshape(x.shape), new_mu, new_sigma, r, d, m, sb


def torch_reference(x, w, b, mu, sigma, rmax, dmax, eps, groups, stop_grad=True):
    """Spec 2 with plain torch ops (differentiable); r, d constants when ``stop_grad``."""
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    m = xg.mean(dim=(1, 3))
    v = xg.var(dim=(1, 3), unbiased=False)
    sb = torch.sqrt(v + eps)
    r = torch.clamp(sb / sigma, 1 / rmax, rmax)
    d = torch.clamp((m - mu) / sigma, -dmax, dmax)
    if stop_grad:
        r, d = r.detach(), d.detach()
    per = lambda a: a[:, None, :, None]  # noqa: E731
    y = ((xg - per(m)) / per(sb) * per(r) + per(d)) * w[:, None] + b[:, None]
    return y.reshape(x.shape)


def grads(layer_or_fn, x, grad, params):
    x = x.detach().clone().requires_grad_()
    y = layer_or_fn(x)
    gs = torch.autograd.grad(y, [x] + list(params), grad)
    return y.detach(), gs
