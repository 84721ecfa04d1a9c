"""Batch Kalman Normalization: the property test against the numpy reference (kalman_reference.py),
bfloat16, channels_last, in-place ops on the output, and the observed variance of inputs with a large mean."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kalman_reference import make_input, np_bkn, np_observed, random_affine, random_prior, t2n
from torch import nn

from bkn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, BatchRenorm2d, GhostBatchNorm2d

# Every test here runs on the compiled kernels and on the Python Functions (conftest.kernels).
pytestmark = pytest.mark.usefixtures("kernels")


# -- property tests ----------------------------------------------------------------------------


@st.composite
def bkn_cases(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 8))
    nsp = draw(st.integers(0, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=nsp, max_size=nsp)))
    if nsp == 0:
        shape, cls = (n, c), BatchKalmanNorm1d
    else:
        shape = (n, c) + spatial
        cls = {1: BatchKalmanNorm1d, 2: BatchKalmanNorm2d, 3: BatchKalmanNorm3d}[nsp]
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    group_size = draw(st.sampled_from(divisors + [None]))
    values = (group_size or n) * math.prod(spatial)
    with_prior = draw(st.booleans()) if values > 1 else True  # BN needs > 1 value per group
    # p = 0 is plain BN, which (rightly) refuses one value per channel.
    p = draw(st.floats(0.0 if values > 1 else 1e-3, 1.0))
    prior_shape = draw(st.sampled_from(["C", "GC"]))
    seed = draw(st.integers(0, 2**16))
    return cls, shape, group_size, with_prior, p, prior_shape, seed


@given(bkn_cases())
def test_property_finite_and_matches_reference(case):
    cls, shape, group_size, with_prior, p, prior_shape, seed = case
    n, c = shape[:2]
    groups = n // (group_size or n)
    layer = cls(c, p=p, group_size=group_size, dtype=torch.float64)
    random_affine(layer, seed=seed)
    x = make_input(shape, dtype=torch.float64, seed=seed).requires_grad_()
    prior = (
        random_prior(groups, c, prior_shape, dtype=torch.float64, seed=seed + 1, requires_grad=True)
        if with_prior
        else None
    )
    y = layer(x, prior=prior)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
    loss = (y * weights).sum() + layer.posterior[1].sum()
    loss.backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    grads = [x.grad, layer.weight.grad, layer.bias.grad]
    grads += [prior[0].grad, prior[1].grad] if with_prior else []
    for g in grads:
        assert g is None or torch.isfinite(g).all()
    assert x.grad is not None and layer.weight.grad is not None
    ref_prior = None if prior is None else (t2n(prior[0]), t2n(prior[1]))
    y_ref, (m, v), _ = np_bkn(t2n(x), t2n(layer.weight), t2n(layer.bias), ref_prior, p if with_prior else 0, groups)
    np.testing.assert_allclose(t2n(y), y_ref, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(t2n(layer.posterior[0]), m, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(t2n(layer.posterior[1]), v, rtol=1e-7, atol=1e-9)


# -- dtypes and memory formats -----------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("with_prior", [True, False])
def test_bfloat16_cpu(with_prior, group_size):
    c = 4
    layer = BatchKalmanNorm2d(c, p=0.7, group_size=group_size)
    random_affine(layer)
    ref = BatchKalmanNorm2d(c, p=0.7, group_size=group_size)
    ref.load_state_dict(layer.state_dict())
    x32 = make_input((4, c, 5, 5), seed=1)
    x = x32.to(torch.bfloat16).requires_grad_()
    groups = 4 // (group_size or 4)
    prior = random_prior(groups, c, "GC", seed=2) if with_prior else None
    y = layer(x, prior=prior)
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert torch.isfinite(y.float()).all() and x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(layer.weight.grad).all()
    y32 = ref(x.detach().float(), prior=prior)
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=2e-2)
    assert layer.running_mean.dtype == torch.float32
    torch.testing.assert_close(layer.running_mean, ref.running_mean, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("with_prior", [True, False])
def test_channels_last_same_as_contiguous(with_prior, group_size):
    c = 5
    a = BatchKalmanNorm2d(c, p=0.6, group_size=group_size)
    random_affine(a)
    b = BatchKalmanNorm2d(c, p=0.6, group_size=group_size)
    b.load_state_dict(a.state_dict())
    x = make_input((4, c, 3, 6), seed=3)
    dy = torch.randn(x.shape)
    xa = x.clone().requires_grad_()
    xb = x.clone().to(memory_format=torch.channels_last).requires_grad_()
    groups = 4 // (group_size or 4)
    prior = random_prior(groups, c, "GC", seed=4) if with_prior else None
    ya, yb = a(xa, prior=prior), b(xb, prior=prior)
    (ya * dy).sum().backward()
    (yb * dy).sum().backward()
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.weight.grad, a.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(b.running_var, a.running_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (BatchKalmanNorm2d(3, group_size=2), {"prior": (torch.zeros(3), torch.ones(3))}),
        lambda: (BatchKalmanNorm2d(3, group_size=2), {}),
        lambda: (GhostBatchNorm2d(3, group_size=2), {}),
        lambda: (BatchRenorm2d(3, group_size=2, rmax=3.0, dmax=5.0), {}),
    ],
    ids=["bkn_prior", "bkn_no_prior", "ghost_bn", "brn"],
)
def test_grouped_output_supports_inplace_ops(make):
    layer, kwargs = make()
    x = make_input((4, 3, 2, 2), seed=1).requires_grad_()
    y = layer(x, **kwargs)
    torch.relu_(y)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_ungrouped_output_supports_inplace_ops():
    layer = BatchKalmanNorm2d(3)
    x = make_input((4, 3, 2, 2), seed=1).requires_grad_()
    y = layer(x, prior=(torch.zeros(3), torch.ones(3)))
    ref = y.detach().clone().relu()
    torch.relu_(y)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), ref)


def _observed_var(kind, x):
    if kind == "bkn_prior":  # shifted sums around a poor prior mean; the guard then uses them alone
        layer = BatchKalmanNorm2d(3, p=0.5)
        y = layer(x, prior=(torch.zeros(3), torch.ones(3)))
        return layer.observed[1][0], y
    if kind == "bkn_adaptive":
        layer = BatchKalmanNorm2d(3, gain="adaptive")
        y = layer(x, prior=(torch.zeros(3), torch.ones(3)))
        return layer.observed[1][0], y
    if kind == "brn":  # rmax = 1, dmax = 0 must be BN (docs/design.md §6); last_stats are then (m_o, v_o)
        layer = BatchRenorm2d(3, rmax=1.0, dmax=0.0)
        y = layer(x)
        return layer.last_stats[1][0], y
    layer = BatchKalmanNorm2d(3, p=0.5, group_size=4)  # "bkn_prior_grouped": explicit centring
    y = layer(x, prior=(torch.zeros(2, 3), torch.ones(2, 3)))
    return layer.observed[1], y


@pytest.mark.parametrize(
    "kind",
    [
        "bkn_prior",
        "bkn_adaptive",
        "brn",
        "bkn_prior_grouped",
    ],
)
def test_observed_variance_accurate_for_large_mean(kind):
    """Inputs with |mean| / std ~ 500 (float32): the observed variance is accurate, as torch BN's."""
    x = 5.0 + 0.01 * make_input((8, 3, 4, 4), seed=2)
    var, y = _observed_var(kind, x)
    groups = 2 if kind == "bkn_prior_grouped" else 1
    _, v_o = np_observed(t2n(x), groups)
    np.testing.assert_allclose(t2n(var).reshape(v_o.shape), v_o, rtol=1e-3)
    # Observation alone (guard, or BRN at r = 1, d = 0): the output is batch normalization.
    chunks = x.chunk(groups)
    expected = torch.cat([nn.BatchNorm2d(3)(c) for c in chunks])
    torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-3)
