"""Batch Kalman Normalization layers against the reference (spec section 1.1) and torch BN.

The numpy functions below are an independent transcription of the spec, written
without looking at how ``bkn`` computes anything: per (group, channel) observed
mean and biased variance, the two-component mixture, the ratio guard, the
normalization and the affine transform.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from bkn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, BatchRenorm2d, GhostBatchNorm2d

# Every test here runs on the compiled kernels and on the Python Functions (conftest.kernels).
pytestmark = pytest.mark.usefixtures("kernels")

EPS = 1e-5
LAYER_FOR_NDIM = {2: BatchKalmanNorm1d, 3: BatchKalmanNorm1d, 4: BatchKalmanNorm2d, 5: BatchKalmanNorm3d}
BN_FOR_NDIM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPE_FOR_NDIM = {2: (8, 3), 3: (8, 3, 5), 4: (8, 3, 3, 4), 5: (8, 3, 2, 3, 2)}


# -- independent numpy reference of spec 1.1 ------------------------------------------------

def np_observed(x: np.ndarray, groups: int):
    """(G, C) mean and biased variance over (samples of the group, spatial positions)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    m_o = xg.mean(axis=(1, 3))
    v_o = ((xg - m_o[:, None, :, None]) ** 2).mean(axis=(1, 3))
    return m_o, v_o


def np_bkn(x, gamma, beta, prior, p, groups=1, eps=EPS, guard=100.0):
    """Returns y, posterior (m, v) and observed (m_o, v_o), all float64; stats of shape (G, C)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape[:2]
    m_o, v_o = np_observed(x, groups)
    values = (n // groups) * int(np.prod(x.shape[2:], dtype=np.int64))
    if prior is None:
        m, v = m_o, v_o
    else:
        m_p = np.broadcast_to(np.asarray(prior[0], dtype=np.float64), (groups, c))
        v_p = np.broadcast_to(np.asarray(prior[1], dtype=np.float64), (groups, c))
        p = np.asarray(p, dtype=np.float64)  # scalar or per channel
        use_prior = True
        if guard is not None and values > 1 and np.mean(v_p / v_o) >= guard:
            use_prior = False
        if use_prior:
            m = p * m_p + (1 - p) * m_o
            v = p * v_p + (1 - p) * v_o + p * (1 - p) * (m_o - m_p) ** 2
        else:
            m, v = m_o, v_o
    xg = x.reshape(groups, n // groups, c, -1)
    y = (xg - m[:, None, :, None]) / np.sqrt(v[:, None, :, None] + eps)
    gamma = np.asarray(gamma, dtype=np.float64)[None, None, :, None]
    y = y * gamma + np.asarray(beta, dtype=np.float64)[None, None, :, None]
    return y.reshape(x.shape), (m, v), (m_o, v_o)


def np_running_update(rm, rv, m, v, values, momentum=0.1):
    """Torch-convention EMA of the posterior averaged over groups, var scaled by n/(n-1)."""
    m_bar, v_bar = m.mean(0), v.mean(0)
    new_mean = (1 - momentum) * rm + momentum * m_bar
    return new_mean, (1 - momentum) * rv + momentum * v_bar * values / (values - 1)


def t2n(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()  # a copy: buffers change in place


def make_input(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    scale = torch.rand(c, generator=g, dtype=torch.float64) * 2 + 0.5
    shift = torch.randn(c, generator=g, dtype=torch.float64) * 2
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale.view(view) + shift.view(view)
    return x.to(dtype)


def random_affine(layer: nn.Module, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) * 1.5 + 0.25)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))


def random_prior(groups, c, shape="GC", dtype=torch.float32, seed=2, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    size = (groups, c) if shape == "GC" else (c,)
    m = (torch.randn(size, generator=g, dtype=torch.float64) * 2).to(dtype)
    v = (torch.rand(size, generator=g, dtype=torch.float64) * 3 + 0.3).to(dtype)
    return m.requires_grad_(requires_grad), v.requires_grad_(requires_grad)


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
@pytest.mark.parametrize("group_size, prior_shape",
                         [(None, "C"), (None, "GC"), (2, "GC"), (2, "C"), (4, "GC")])
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

    y_ref, (m, v), (m_o, v_o) = np_bkn(t2n(x), t2n(layer.weight), t2n(layer.bias),
                                      (t2n(prior[0]), t2n(prior[1])), p, groups)
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


@pytest.mark.parametrize("case", ["prior_C", "prior_GC_groups", "prior_C_groups", "learned_gain",
                                  "learned_gain_groups", "no_prior", "no_prior_groups", "one_value_prior",
                                  "bkn1d_2d_input", "bkn3d"])
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
    ref = torch.autograd.grad((m ** 2).sum() + v.log().sum(), (x2, m_p2, v_p2))
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
        xi = x.detach()[i * g:(i + 1) * g].clone().requires_grad_()
        pi = None if prior is None else (prior[0].detach()[i].clone().requires_grad_(),
                                         prior[1].detach()[i].clone().requires_grad_())
        yi = ref(xi, prior=pi)
        (yi * dy[i * g:(i + 1) * g]).sum().backward()
        torch.testing.assert_close(y[i * g:(i + 1) * g], yi, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad[i * g:(i + 1) * g], xi.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.posterior[0][i], ref.posterior[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.posterior[1][i], ref.posterior[1][0], atol=1e-5, rtol=1e-5)
        if prior is not None:
            torch.testing.assert_close(prior[0].grad[i], pi[0].grad, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(prior[1].grad[i], pi[1].grad, atol=1e-5, rtol=1e-5)


# -- adaptive gain -----------------------------------------------------------------------------

def _adaptive_data(n=128, c=3, s=1.0, seed=0):
    """Per-sample offsets (std s) dominate the noise of a group mean; pixels add a little."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([1.0, -2.0, 0.5])[:c]
    a = torch.randn(n, c, 1, 1, generator=g) * s
    e = torch.randn(n, c, 4, 4, generator=g) * 0.5
    return mu, mu.view(1, c, 1, 1) + a + e


def _capture_gain(layer):
    seen = []
    layer.gain.register_forward_hook(lambda mod, args, out: seen.append(out))
    return seen


def test_adaptive_gain_estimator_and_monotonicity():
    c = 3
    mu, x = _adaptive_data(n=512, c=c)
    bias = torch.tensor([1.0, -1.2, 0.9])  # a fixed prediction error, known to the test
    prior = (mu + bias, torch.ones(c))
    ps = {}
    for g in (2, 4, 16, 32):
        layer = BatchKalmanNorm2d(c, gain="adaptive", group_size=g)
        seen = _capture_gain(layer)
        xi = x.clone().requires_grad_()
        pm, pv = prior[0].clone().requires_grad_(), prior[1].clone().requires_grad_()
        y = layer(xi, prior=(pm, pv))
        p = seen[-1]
        assert isinstance(p, torch.Tensor) and tuple(p.shape) == (c,)
        assert not p.requires_grad and p.grad_fn is None
        assert torch.all((p >= 0) & (p <= 1))
        assert list(layer.gain.parameters()) == []
        # Independent numpy estimate, as documented: U_obs = var(per-sample means) / g,
        # U_prior = max(mean_groups (m_o - m_p)^2 - U_obs, 0), p = U_obs / (U_obs + U_prior).
        xn = t2n(x)
        spread = xn.mean(axis=(2, 3)).var(axis=0, ddof=1)
        m_o, _ = np_observed(xn, x.shape[0] // g)
        innov = ((m_o - t2n(prior[0])) ** 2).mean(0)
        u_obs = spread / g
        u_prior = np.maximum(innov - u_obs, 0)
        np.testing.assert_allclose(t2n(p), u_obs / (u_obs + u_prior), rtol=1e-4, atol=1e-6)
        # The layer normalized with that per-channel gain.
        y_ref, _, _ = np_bkn(xn, t2n(layer.weight), t2n(layer.bias), (t2n(prior[0]), t2n(prior[1])),
                             t2n(p), x.shape[0] // g)
        np.testing.assert_allclose(t2n(y), y_ref, rtol=1e-4, atol=1e-4)
        y.pow(2).sum().backward()  # gradients still reach x and the prior
        assert torch.isfinite(xi.grad).all() and pm.grad is not None and pv.grad is not None
        ps[g] = p
    # Smaller group -> noisier observation -> more weight on the prior.
    assert torch.all(ps[2] > ps[4]) and torch.all(ps[4] > ps[16]) and torch.all(ps[16] > ps[32])
    assert torch.all(ps[2] > 3 * ps[32])


def test_adaptive_gain_uses_estimates_before_the_current_batch():
    c = 3
    mu, x1 = _adaptive_data(seed=1)
    _, x2 = _adaptive_data(seed=2, s=3.0)  # a very different spread
    layer = BatchKalmanNorm2d(c, gain="adaptive", group_size=4)
    seen = _capture_gain(layer)
    prior = (mu + 0.3, torch.ones(c))
    layer(x1, prior=prior)
    layer(x2, prior=prior)
    torch.testing.assert_close(seen[1], seen[0])  # second step: estimates from the first batch
    layer(x2, prior=prior)
    assert not torch.allclose(seen[2], seen[1])   # the EMA has moved by now
    s1 = t2n(x1).mean(axis=(2, 3)).var(axis=0, ddof=1)
    s2 = t2n(x2).mean(axis=(2, 3)).var(axis=0, ddof=1)
    expected = 0.9 * (0.9 * s1 + 0.1 * s2) + 0.1 * s2
    np.testing.assert_allclose(t2n(layer.gain.sample_mean_var), expected, rtol=1e-5)


def test_adaptive_gain_p_property_is_the_gain_used():
    mu, x = _adaptive_data(n=64)
    layer = BatchKalmanNorm2d(3, gain="adaptive", group_size=8)
    seen = _capture_gain(layer)
    prior = (mu + 0.5, torch.ones(3))
    layer(x, prior=prior)
    layer(x, prior=prior)  # the gain used now comes from the estimates the property reads
    torch.testing.assert_close(layer.gain.p, seen[-1])


# -- eval mode, detach_prior, one value per channel -------------------------------------------

def test_eval_uses_running_stats_and_ignores_prior():
    c = 4
    layer = BatchKalmanNorm2d(c, p=0.9)
    random_affine(layer)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(c))
        layer.running_var.copy_(torch.rand(c) + 0.5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    x = make_input((2, c, 3, 3), seed=3)
    prior = random_prior(1, c, "C", seed=4)
    y1 = layer(x)
    y2 = layer(x, prior=prior)
    y3 = layer(x, prior=prior)
    rm, rv = layer.running_mean.view(1, c, 1, 1), layer.running_var.view(1, c, 1, 1)
    expected = (x - rm) / torch.sqrt(rv + EPS)
    expected = expected * layer.weight.view(1, c, 1, 1) + layer.bias.view(1, c, 1, 1)
    torch.testing.assert_close(y1, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(y1, y2) and torch.equal(y2, y3)
    assert not layer.prior_used
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    # One sample of one value per channel is fine at inference.
    single = make_input((1, c, 1, 1), seed=5)
    torch.testing.assert_close(layer(single), layer(single.clone()))


@pytest.mark.parametrize("detach", [True, False])
def test_detach_prior(detach):
    layer = BatchKalmanNorm2d(3, p=0.5, detach_prior=detach)
    x = make_input((4, 3, 2, 2), seed=1).requires_grad_()
    m_p, v_p = random_prior(1, 3, "C", seed=2, requires_grad=True)
    y = layer(x, prior=(m_p, v_p))
    (y.pow(3).sum() + layer.posterior[1].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if detach:
        assert m_p.grad is None and v_p.grad is None
    else:
        assert m_p.grad is not None and v_p.grad is not None
        assert m_p.grad.abs().sum() > 0 and v_p.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, shape, group_size", [
    (BatchKalmanNorm1d, (1, 5), None),
    (BatchKalmanNorm2d, (1, 5, 1, 1), None),
    (BatchKalmanNorm1d, (4, 5), 1),
])
def test_one_value_per_channel(cls, shape, group_size):
    n, c = shape[:2]
    groups = n // (group_size or n)
    layer = cls(c, p=0.9, group_size=group_size)
    random_affine(layer)
    x = make_input(shape, seed=2).requires_grad_()
    m_p, v_p = random_prior(groups, c, "GC", seed=3, requires_grad=True)
    y = layer(x, prior=(m_p, v_p))
    y.pow(2).sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(m_p.grad).all() and torch.isfinite(v_p.grad).all()
    y_ref, (m, v), _ = np_bkn(t2n(x), t2n(layer.weight), t2n(layer.bias), (t2n(m_p), t2n(v_p)), 0.9, groups)
    np.testing.assert_allclose(t2n(y), y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t2n(layer.posterior[1]), v, rtol=1e-5, atol=1e-6)
    fresh = cls(c, group_size=group_size)
    with pytest.raises(ValueError, match=cls.__name__):
        fresh(x.detach())


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
    seed = draw(st.integers(0, 2 ** 16))
    return cls, shape, group_size, with_prior, p, prior_shape, seed


@given(bkn_cases())
def test_property_finite_and_matches_reference(case):
    cls, shape, group_size, with_prior, p, prior_shape, seed = case
    n, c = shape[:2]
    groups = n // (group_size or n)
    layer = cls(c, p=p, group_size=group_size, dtype=torch.float64)
    random_affine(layer, seed=seed)
    x = make_input(shape, dtype=torch.float64, seed=seed).requires_grad_()
    prior = random_prior(groups, c, prior_shape, dtype=torch.float64, seed=seed + 1,
                         requires_grad=True) if with_prior else None
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
    y_ref, (m, v), _ = np_bkn(t2n(x), t2n(layer.weight), t2n(layer.bias), ref_prior,
                              p if with_prior else 0, groups)
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


@pytest.mark.parametrize("make", [
    lambda: (BatchKalmanNorm2d(3, group_size=2), {"prior": (torch.zeros(3), torch.ones(3))}),
    lambda: (BatchKalmanNorm2d(3, group_size=2), {}),
    lambda: (GhostBatchNorm2d(3, group_size=2), {}),
    lambda: (BatchRenorm2d(3, group_size=2, rmax=3.0, dmax=5.0), {}),
], ids=["bkn_prior", "bkn_no_prior", "ghost_bn", "brn"])
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
    if kind == "brn":  # rmax = 1, dmax = 0 must be BN (spec 2); last_stats are then (m_o, v_o)
        layer = BatchRenorm2d(3, rmax=1.0, dmax=0.0)
        y = layer(x)
        return layer.last_stats[1][0], y
    layer = BatchKalmanNorm2d(3, p=0.5, group_size=4)  # "bkn_prior_grouped": explicit centring
    y = layer(x, prior=(torch.zeros(2, 3), torch.ones(2, 3)))
    return layer.observed[1], y


@pytest.mark.parametrize("kind", [
    "bkn_prior",
    "bkn_adaptive",
    "brn",
    "bkn_prior_grouped",
])
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
