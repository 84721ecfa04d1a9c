"""Batch Kalman Normalization: the adaptive gain, eval mode, detach_prior and one value per channel
(docs/design.md §1; the numpy reference is in kalman_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kalman_reference import EPS, make_input, np_bkn, np_observed, random_affine, random_prior, t2n

from bkn import BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d
from bkn.layers.gain import make_gain

# Every test here runs on the compiled kernels and on the Python Functions (conftest.kernels).
pytestmark = pytest.mark.usefixtures("kernels")


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
        y_ref, _, _ = np_bkn(
            xn, t2n(layer.weight), t2n(layer.bias), (t2n(prior[0]), t2n(prior[1])), t2n(p), x.shape[0] // g
        )
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
    assert not torch.allclose(seen[2], seen[1])  # the EMA has moved by now
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


def test_adaptive_gain_first_three_steps_follow_the_formula():
    """Step 1 uses batch 1's own estimates (the device-side initialisation), step 2 the same
    (an EMA of one batch), step 3 their EMA with batch 2; each p = U_obs / (U_obs + U_prior)."""
    c, g = 3, 4
    mu, x1 = _adaptive_data(n=32, seed=3)
    _, x2 = _adaptive_data(n=32, seed=4, s=2.0)
    _, x3 = _adaptive_data(n=32, seed=5, s=0.5)
    prior = (mu + torch.tensor([0.4, -0.2, 0.1]), torch.ones(c))
    layer = BatchKalmanNorm2d(c, gain="adaptive", group_size=g)
    seen = _capture_gain(layer)
    for x in (x1, x2, x3):
        layer(x, prior=prior)

    def stats(x):
        xn = t2n(x)
        m_o, _ = np_observed(xn, x.shape[0] // g)
        return xn.mean(axis=(2, 3)).var(axis=0, ddof=1), ((m_o - t2n(prior[0])) ** 2).mean(0)

    def gain(spread, innov):
        u_obs = spread / g
        return u_obs / (u_obs + np.maximum(innov - u_obs, 0))

    (s1, i1), (s2, i2) = stats(x1), stats(x2)
    expected = [gain(s1, i1), gain(s1, i1), gain(0.9 * s1 + 0.1 * s2, 0.9 * i1 + 0.1 * i2)]
    for got, want in zip(seen, expected):
        np.testing.assert_allclose(t2n(got), want, rtol=1e-5, atol=1e-7)
    assert bool(layer.gain.initialised)


def test_adaptive_gain_runs_without_reading_the_device():
    """On ``meta`` tensors (no values) a ``bool(...)`` of a tensor raises: the gain's first-step
    initialisation must be chosen on the device, not by a host read (a sync per step on a GPU)."""
    gain = make_gain("adaptive", 0.9, 3, device="meta")
    x = torch.empty(8, 3, 4, 4, device="meta")
    obs, prior = torch.empty(4, 3, device="meta"), torch.empty(3, device="meta")
    for _ in range(2):
        p = gain(x, obs, prior, 2)
        assert p.device.type == "meta" and p.shape == (3,)


@pytest.mark.parametrize("kind", ["fixed", "learned", "adaptive"])
@pytest.mark.parametrize("cls", [BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d])
def test_gain_follows_the_layers_device_and_dtype(kind, cls):
    layer = cls(5, gain=kind, p=0.3, device="meta", dtype=torch.float64)
    tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
    if kind != "fixed":
        assert any(name.startswith("gain.") for name in tensors)
    for name, t in tensors.items():
        assert t.device.type == "meta", name
        if t.is_floating_point():
            assert t.dtype == torch.float64, name
    moved = cls(5, gain=kind, p=0.3).to("meta")
    for name, t in list(moved.named_parameters()) + list(moved.named_buffers()):
        assert t.device.type == "meta", name


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


@pytest.mark.parametrize(
    "cls, shape, group_size",
    [
        (BatchKalmanNorm1d, (1, 5), None),
        (BatchKalmanNorm2d, (1, 5, 1, 1), None),
        (BatchKalmanNorm1d, (4, 5), 1),
    ],
)
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
