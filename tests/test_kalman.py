"""Batch Kalman Normalization layers against the reference (docs/design.md §1) and torch BN:
p = 0 is BN, the official update against numpy, the ratio guard, gradients, micro-batch groups.

The numpy reference is in kalman_reference.py; the adaptive gain, eval mode and detach_prior are in
test_kalman_gain_and_eval.py, the property test, dtypes and memory formats in
test_kalman_properties_and_formats.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kalman_reference import (
    BN_FOR_NDIM,
    LAYER_FOR_NDIM,
    SHAPE_FOR_NDIM,
    make_input,
    np_bkn,
    np_observed,
    np_running_update,
    random_affine,
    random_prior,
    t2n,
)
from torch.func import functional_call

from bkn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d

# Every test here runs on the compiled kernels and on the Python Functions (conftest.kernels).
pytestmark = pytest.mark.usefixtures("kernels")


# -- p = 0 and no prior: exactly torch.nn.BatchNorm ------------------------------------------


@pytest.mark.parametrize("ndim", [2, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("variant", ["p0_with_prior", "no_prior"])
def test_equals_torch_batchnorm(variant, momentum, ndim):
    c = 3
    shape = {2: (6, c), 4: (4, c, 5, 6), 5: (2, c, 3, 4, 3)}[ndim]
    bn = BN_FOR_NDIM[ndim](c, momentum=momentum)
    bkn = LAYER_FOR_NDIM[ndim](c, p=0.0 if variant == "p0_with_prior" else 0.9, momentum=momentum)
    random_affine(bn)
    bkn.load_state_dict(bn.state_dict())
    for step in range(3):
        x = make_input(shape, seed=10 + step)
        x_bn, x_bkn = x.clone().requires_grad_(), x.clone().requires_grad_()
        dy = torch.randn(shape)
        y_bn = bn(x_bn)
        if variant == "p0_with_prior":
            prior = random_prior(1, c, "C", seed=step, requires_grad=True)
            y_bkn = bkn(x_bkn, prior=prior)
        else:
            y_bkn = bkn(x_bkn)
        assert not bkn.prior_used
        (y_bn * dy).sum().backward()
        (y_bkn * dy).sum().backward()
        torch.testing.assert_close(y_bkn, y_bn, atol=1e-6, rtol=0)
        torch.testing.assert_close(x_bkn.grad, x_bn.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(bkn.weight.grad, bn.weight.grad, atol=1e-6, rtol=0)
        torch.testing.assert_close(bkn.bias.grad, bn.bias.grad, atol=1e-6, rtol=0)
        if variant == "p0_with_prior":
            assert prior[0].grad is None and prior[1].grad is None  # p = 0: the prior plays no part
        # The exposed statistics are the batch statistics BN normalized with.
        m_o, v_o = np_observed(t2n(x), 1)
        np.testing.assert_allclose(t2n(bkn.posterior[0]), m_o, atol=1e-5)
        np.testing.assert_allclose(t2n(bkn.posterior[1]), v_o, rtol=1e-5, atol=1e-6)
        for mod in (bn, bkn):
            mod.weight.grad = mod.bias.grad = None
    torch.testing.assert_close(bkn.running_mean, bn.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(bkn.running_var, bn.running_var, atol=1e-6, rtol=0)
    assert int(bkn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    bn.eval()
    bkn.eval()
    x = make_input(shape, seed=99)
    torch.testing.assert_close(bkn(x), bn(x), atol=1e-6, rtol=0)


# -- the official update against numpy -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size, prior_shape", [(None, "C"), (None, "GC"), (2, "GC"), (2, "C"), (4, "GC")])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("ndim", [2, 4, 5])
def test_update_matches_numpy(ndim, p, group_size, prior_shape, dtype):
    shape = SHAPE_FOR_NDIM[ndim]
    n, c = shape[:2]
    groups = n // (group_size or n)
    layer = LAYER_FOR_NDIM[ndim](c, p=p, group_size=group_size, dtype=dtype)
    random_affine(layer)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-default running estimates, so the EMA is really checked
        layer.running_mean.copy_(torch.randn(c, generator=g))
        layer.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    rm0, rv0 = t2n(layer.running_mean), t2n(layer.running_var)
    x = make_input(shape, dtype=dtype, seed=3)
    # Random priors on the data's scale: random means, variances a random factor (0.2 to 5)
    # of the observed ones, so that the guard (ratio 100) stays far away.
    _, v_o = np_observed(t2n(x), groups)
    rng = np.random.default_rng(4)
    if prior_shape == "GC":
        m_p, v_p = rng.normal(size=(groups, c)) * 2, v_o * rng.uniform(0.2, 5, size=(groups, c))
    else:
        m_p, v_p = rng.normal(size=c) * 2, v_o.min(0) * rng.uniform(0.2, 5, size=c)
    prior = (torch.tensor(m_p, dtype=dtype), torch.tensor(v_p, dtype=dtype))

    y = layer(x, prior=prior)

    y_ref, (m, v), (m_o, v_o) = np_bkn(
        t2n(x), t2n(layer.weight), t2n(layer.bias), (t2n(prior[0]), t2n(prior[1])), p, groups
    )
    assert np.mean(np.broadcast_to(t2n(prior[1]), v_o.shape) / v_o) < 100  # the mixture is used
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(t2n(y), y_ref, **tol)
    assert layer.prior_used
    post_m, post_v = layer.posterior
    assert tuple(post_m.shape) == tuple(post_v.shape) == (groups, c)
    np.testing.assert_allclose(t2n(post_m), m, **tol)
    np.testing.assert_allclose(t2n(post_v), v, **tol)
    np.testing.assert_allclose(t2n(layer.observed[0]), m_o, **tol)
    np.testing.assert_allclose(t2n(layer.observed[1]), v_o, **tol)
    last_m, last_v = layer.last_stats
    assert not last_m.requires_grad and not last_v.requires_grad
    np.testing.assert_allclose(t2n(last_m), m, **tol)
    # Running estimates: EMA of the posterior averaged over the groups, var * n / (n - 1).
    values = (n // groups) * math.prod(shape[2:])
    rm, rv = np_running_update(rm0, rv0, m, v, values)
    np.testing.assert_allclose(t2n(layer.running_mean), rm, **tol)
    np.testing.assert_allclose(t2n(layer.running_var), rv, **tol)
    assert int(layer.num_batches_tracked) == 1
    # The mixture really differs from plain BN here (the test would notice a no-op).
    assert np.abs(m - m_o).max() > 1e-2


@pytest.mark.parametrize("side", ["below", "above"])
@pytest.mark.parametrize("group_size, prior_shape", [(None, "C"), (2, "GC"), (4, "GC")])
@pytest.mark.parametrize("ndim", [2, 4, 5])
def test_guard_threshold(ndim, group_size, prior_shape, side):
    """mean(v_p / v_o) just below 100: mixture; at/above 100: the observation alone."""
    shape = SHAPE_FOR_NDIM[ndim]
    n, c = shape[:2]
    groups = n // (group_size or n)
    rng = np.random.default_rng(7)
    x = make_input(shape, seed=8)
    m_o, v_o = np_observed(t2n(x), groups)
    target = 99.0 if side == "below" else 101.0
    if prior_shape == "GC":
        w = rng.uniform(0.5, 1.5, size=(groups, c))
        w /= w.mean()
        v_p = target * v_o * w
        m_p = m_o + rng.normal(size=(groups, c)) * np.sqrt(v_o)
    else:  # a shared (C,) prior: the ratio averages v_p / v_o over groups and channels
        w = rng.uniform(0.5, 1.5, size=c)
        base = w / (1.0 / v_o).mean(0)  # mean over groups of base / v_o = w
        v_p = target * base / w.mean()
        m_p = m_o.mean(0) + rng.normal(size=c) * np.sqrt(v_o.mean(0))
    ratio = np.mean(np.broadcast_to(v_p, v_o.shape) / v_o)
    assert abs(ratio - target) < 1e-6 * target
    prior = (torch.tensor(m_p, dtype=torch.float32), torch.tensor(v_p, dtype=torch.float32))
    layer = LAYER_FOR_NDIM[ndim](c, p=0.5, group_size=group_size)
    random_affine(layer)
    y = layer(x, prior=prior)
    y_ref, (m, v), _ = np_bkn(t2n(x), t2n(layer.weight), t2n(layer.bias), (m_p, v_p), 0.5, groups)
    np.testing.assert_allclose(t2n(y), y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(t2n(layer.posterior[0]), m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t2n(layer.posterior[1]), v, rtol=1e-5, atol=1e-5)
    if side == "above":
        np.testing.assert_allclose(t2n(layer.posterior[0]), m_o, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t2n(layer.posterior[1]), v_o, rtol=1e-5, atol=1e-6)
    else:  # the (huge) prior variance really entered the posterior
        assert np.all(t2n(layer.posterior[1]) > 10 * v_o)


def test_guard_is_configurable():
    x = make_input((4, 3, 3, 3), seed=1)
    _, v_o = np_observed(t2n(x), 1)
    m_p = torch.zeros(3)
    v_p = torch.tensor(20.0 * v_o[0], dtype=torch.float32)  # ratio 20
    strict = BatchKalmanNorm2d(3, p=0.5, guard=10.0)
    strict(x, prior=(m_p, v_p))
    torch.testing.assert_close(strict.posterior[1], strict.observed[1])
    loose = BatchKalmanNorm2d(3, p=0.5, guard=None)
    v_big = v_p * 1000  # ratio 20000, no guard at all
    loose(x, prior=(m_p, v_big))
    assert torch.all(loose.posterior[1] > 1000 * loose.observed[1])


# -- gradients -------------------------------------------------------------------------------


def _as_function(layer, with_prior=True, gain_param=False):
    """f(x, gamma, beta, [m_p, v_p], [logit]) -> (y, posterior mean, posterior var)."""

    def f(x, w, b, *rest):
        params = {"weight": w, "bias": b}
        kwargs = {}
        rest = list(rest)
        if gain_param:
            params["gain.logit"] = rest.pop()
        if with_prior:
            kwargs["prior"] = (rest[0], rest[1])
        y = functional_call(layer, params, (x,), kwargs)
        return y, layer.posterior[0], layer.posterior[1]

    return f


@pytest.mark.parametrize(
    "case",
    [
        "prior_C",
        "prior_GC_groups",
        "prior_C_groups",
        "learned_gain",
        "learned_gain_groups",
        "no_prior",
        "no_prior_groups",
        "one_value_prior",
        "bkn1d_2d_input",
        "bkn3d",
    ],
)
def test_gradcheck(case):
    dt = torch.float64
    cls, shape, group_size, with_prior = BatchKalmanNorm2d, (4, 3, 2, 3), None, True
    prior_shape, gain = "C", "fixed"
    if case == "prior_GC_groups":
        group_size, prior_shape = 2, "GC"
    elif case == "prior_C_groups":
        group_size = 2
    elif case == "learned_gain":
        gain = "learned"
    elif case == "learned_gain_groups":
        gain, group_size, prior_shape = "learned", 2, "GC"
    elif case == "no_prior":
        with_prior = False
    elif case == "no_prior_groups":
        with_prior, group_size = False, 2
    elif case == "one_value_prior":
        cls, shape = BatchKalmanNorm1d, (1, 3)
    elif case == "bkn1d_2d_input":
        cls, shape, group_size, prior_shape = BatchKalmanNorm1d, (6, 3), 3, "GC"
    elif case == "bkn3d":
        cls, shape = BatchKalmanNorm3d, (2, 3, 2, 2, 2)
    n, c = shape[:2]
    groups = n // (group_size or n)
    layer = cls(c, p=0.7, gain=gain, group_size=group_size, dtype=dt)
    random_affine(layer)
    x = make_input(shape, dtype=dt, seed=11).requires_grad_()
    inputs = [x, layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()]
    if with_prior:
        inputs += list(random_prior(groups, c, prior_shape, dtype=dt, seed=12, requires_grad=True))
    if gain == "learned":
        inputs.append(torch.tensor(0.3, dtype=dt, requires_grad=True))
    f = _as_function(layer, with_prior, gain == "learned")
    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)
    if with_prior:
        assert layer.prior_used


def test_gradient_through_posterior_only():
    """A loss on the posterior alone (as the next layer's prior uses it) gets correct x and prior grads."""
    dt = torch.float64
    layer = BatchKalmanNorm2d(3, p=0.4, group_size=2, dtype=dt)
    x = make_input((4, 3, 2, 2), dtype=dt, seed=1).requires_grad_()
    m_p, v_p = random_prior(2, 3, "GC", dtype=dt, seed=3, requires_grad=True)
    layer(x, prior=(m_p, v_p))
    loss = (layer.posterior[0] ** 2).sum() + layer.posterior[1].log().sum()
    gx, gm, gv = torch.autograd.grad(loss, (x, m_p, v_p))
    # Independent composition of torch ops for the same quantity.
    x2 = x.detach().clone().requires_grad_()
    m_p2, v_p2 = m_p.detach().clone().requires_grad_(), v_p.detach().clone().requires_grad_()
    xg = x2.reshape(2, 2, 3, -1)
    m_o = xg.mean((1, 3))
    v_o = ((xg - m_o[:, None, :, None]) ** 2).mean((1, 3))
    m = 0.4 * m_p2 + 0.6 * m_o
    v = 0.4 * v_p2 + 0.6 * v_o + 0.24 * (m_o - m_p2) ** 2
    ref = torch.autograd.grad((m**2).sum() + v.log().sum(), (x2, m_p2, v_p2))
    for a, b in zip((gx, gm, gv), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# -- micro-batch groups ----------------------------------------------------------------------


@pytest.mark.parametrize("with_prior", [True, False])
@pytest.mark.parametrize("g", [1, 2, 3])
def test_group_size_equals_separate_chunks(g, with_prior):
    n, c = 6, 4
    groups = n // g
    layer = BatchKalmanNorm2d(c, p=0.6, group_size=g)
    random_affine(layer)
    x = make_input((n, c, 3, 3), seed=21).requires_grad_()
    dy = torch.randn(x.shape)
    prior = random_prior(groups, c, "GC", seed=22, requires_grad=True) if with_prior else None
    y = layer(x, prior=prior)
    (y * dy).sum().backward()
    assert tuple(layer.posterior[0].shape) == (groups, c)
    for i in range(groups):
        ref = BatchKalmanNorm2d(c, p=0.6)
        ref.load_state_dict(layer.state_dict())
        xi = x.detach()[i * g : (i + 1) * g].clone().requires_grad_()
        pi = (
            None
            if prior is None
            else (prior[0].detach()[i].clone().requires_grad_(), prior[1].detach()[i].clone().requires_grad_())
        )
        yi = ref(xi, prior=pi)
        (yi * dy[i * g : (i + 1) * g]).sum().backward()
        torch.testing.assert_close(y[i * g : (i + 1) * g], yi, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad[i * g : (i + 1) * g], xi.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.posterior[0][i], ref.posterior[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.posterior[1][i], ref.posterior[1][0], atol=1e-5, rtol=1e-5)
        if prior is not None:
            torch.testing.assert_close(prior[0].grad[i], pi[0].grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prior[1].grad[i], pi[1].grad, atol=1e-5, rtol=1e-5)
