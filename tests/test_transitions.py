"""Prior transitions (docs/design.md §4): closed-form moment rules against Monte-Carlo, and the chain wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import nn

import bkn
from bkn import transitions
from bkn.transitions import Analytic, Moments, MonteCarlo, Sample
from bkn.transitions.analytic import gaussian_max_moments, relu_moments

Z = 5.0  # tolerance in Monte-Carlo standard errors


def mc_tolerances(samples: np.ndarray, n_eff: float):
    """Standard errors of the sample mean and of the sample (biased) variance of ``samples``."""
    m = samples.mean()
    c = samples - m
    var = (c**2).mean()
    m4 = (c**4).mean()
    return math.sqrt(var / n_eff), math.sqrt(max(m4 - var**2, 0.0) / n_eff)


# -- scalar rules --------------------------------------------------------------------------


@pytest.mark.parametrize("mu, sigma", [(0.0, 1.0), (1.0, 0.5), (-1.0, 2.0), (3.0, 1.0), (-2.5, 1.0), (0.2, 3.0)])
def test_relu_moments_vs_monte_carlo_and_quadrature(mu, sigma):
    n = 1_000_000
    rng = np.random.default_rng(0)
    r = np.maximum(rng.normal(mu, sigma, size=n), 0.0)
    mean, var = relu_moments(torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma**2], dtype=torch.float64))
    mean, var = float(mean), float(var)
    se_m, se_v = mc_tolerances(r, n)
    assert abs(mean - r.mean()) < Z * se_m + 1e-12
    assert abs(var - r.var()) < Z * se_v + 1e-12
    # Exact values by numerical integration (scipy): the formula, not just MC agreement.
    pdf = stats.norm(mu, sigma).pdf
    e1 = integrate.quad(lambda t: t * pdf(t), 0, np.inf)[0]
    e2 = integrate.quad(lambda t: t * t * pdf(t), 0, np.inf)[0]
    assert mean == pytest.approx(e1, rel=1e-6, abs=1e-9)
    assert var == pytest.approx(e2 - e1 * e1, rel=1e-6, abs=1e-9)


def test_relu_moments_float32_and_degenerate_variance():
    mean, var = relu_moments(torch.tensor([2.0, -2.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(mean, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(var, torch.tensor([0.0, 0.0]))


def test_gaussian_max_moments_known_values():
    mean, var = gaussian_max_moments(2)
    assert mean == pytest.approx(1 / math.sqrt(math.pi), abs=1e-7)
    assert var == pytest.approx(1 - 1 / math.pi, abs=1e-7)
    mean1, var1 = gaussian_max_moments(1)
    assert mean1 == pytest.approx(0.0, abs=1e-9) and var1 == pytest.approx(1.0, abs=1e-7)
    # E[max of 3] = 3 / (2 sqrt(pi)); a larger count checked by Monte-Carlo.
    assert gaussian_max_moments(3)[0] == pytest.approx(3 / (2 * math.sqrt(math.pi)), abs=1e-7)
    rng = np.random.default_rng(1)
    mx = rng.standard_normal((200_000, 9)).max(1)
    m9, v9 = gaussian_max_moments(9)
    se_m, se_v = mc_tolerances(mx, mx.size)
    assert abs(m9 - mx.mean()) < Z * se_m and abs(v9 - mx.var()) < Z * se_v


# -- convolution / linear rules against a direct Monte-Carlo of the real module ----------------


def _gaussian_field(mean: torch.Tensor, var: torch.Tensor, batch: int, spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = mean.shape[-1]
    view = (1, c) + (1,) * len(spatial)
    z = torch.randn((batch, c, *spatial), generator=g, dtype=torch.float64)
    return z * var.reshape(view).sqrt() + mean.reshape(view)


def _per_channel_check(out: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, n_eff: float):
    """``out`` (B, C, *S): per-channel moments over (B, S) agree with ``mean, var`` (C,)."""
    flat = out.transpose(0, 1).reshape(out.shape[1], -1).numpy()
    for ch in range(flat.shape[0]):
        se_m, se_v = mc_tolerances(flat[ch], n_eff)
        assert abs(float(mean[ch]) - flat[ch].mean()) < Z * se_m, (ch, float(mean[ch]), flat[ch].mean())
        assert abs(float(var[ch]) - flat[ch].var()) < Z * se_v, (ch, float(var[ch]), flat[ch].var())


@pytest.mark.parametrize("kind", ["conv2d", "conv2d_grouped", "conv1d", "conv3d", "linear"])
def test_analytic_linear_maps_vs_monte_carlo(kind):
    torch.manual_seed(0)
    if kind == "conv2d":
        module, cin, spatial = nn.Conv2d(3, 4, 3, stride=3), 3, (30, 30)
    elif kind == "conv2d_grouped":
        module, cin, spatial = nn.Conv2d(4, 6, 2, stride=2, groups=2, bias=False), 4, (30, 30)
    elif kind == "conv1d":
        module, cin, spatial = nn.Conv1d(3, 5, 4, stride=4), 3, (400,)
    elif kind == "conv3d":
        module, cin, spatial = nn.Conv3d(2, 3, 2, stride=2), 2, (10, 10, 10)
    else:
        module, cin, spatial = nn.Linear(6, 4), 6, ()
    module = module.double()
    mean = torch.randn(1, cin, dtype=torch.float64)
    var = torch.rand(1, cin, dtype=torch.float64) * 2 + 0.2
    state = Analytic().module(module, Moments(mean, var, spatial))
    batch = 20_000 if kind == "linear" else 200
    with torch.no_grad():
        out = module(_gaussian_field(mean, var, batch, spatial))
    assert tuple(state.mean.shape) == tuple(state.var.shape) == (1, out.shape[1])
    assert state.spatial == tuple(out.shape[2:])
    # stride == kernel: output positions see disjoint inputs, so all outputs are independent.
    n_eff = out.numel() // out.shape[1]
    _per_channel_check(out, state.mean[0].detach(), state.var[0].detach(), n_eff)


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=3, stride=2, padding=0),
        dict(kernel_size=5, stride=2, padding=2, dilation=1),
        dict(kernel_size=3, stride=1, padding=0, dilation=2),
        dict(kernel_size=1, stride=2),
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=3, padding="valid"),
    ],
)
def test_analytic_conv_spatial_size(conv):
    module = nn.Conv2d(2, 3, **conv)
    state = Analytic().module(module, Moments(torch.zeros(1, 2), torch.ones(1, 2), (11, 8)))
    assert state.spatial == tuple(module(torch.zeros(1, 2, 11, 8)).shape[2:])


def test_analytic_conv_stride1_vs_monte_carlo():
    """Overlapping windows: marginal moments are the same; positions k apart are independent."""
    conv = nn.Conv2d(3, 4, 3, padding=0).double()
    mean = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    var = torch.tensor([[1.0, 0.3, 2.5]], dtype=torch.float64)
    state = Analytic().conv(conv, Moments(mean, var, (20, 20)))
    with torch.no_grad():
        out = conv(_gaussian_field(mean, var, 300, (20, 20), seed=3))
    n_eff = 300 * math.ceil(18 / 3) ** 2
    _per_channel_check(out, state.mean[0].detach(), state.var[0].detach(), n_eff)


# -- Analytic vs a Monte-Carlo surrogate from the same starting moments ------------------------

DRAWS = 16000


def _start(groups=2, c=3, spatial=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(groups, c, generator=g, dtype=torch.float64)
    var = torch.rand(groups, c, generator=g, dtype=torch.float64) * 2 + 0.3
    moments = Moments(mean, var, spatial)
    z = torch.randn(groups, DRAWS, c, *spatial, generator=g, dtype=torch.float64)
    view = (groups, 1, c) + (1,) * len(spatial)
    sample = Sample((z * var.sqrt().view(view) + mean.view(view)).reshape(groups * DRAWS, c, *spatial), DRAWS)
    return moments, sample


def _compare(analytic_state, mc_state, n_eff_per_draw=1):
    """to_prior of both transitions agree within Monte-Carlo error (per group and channel)."""
    am, av = (t.detach() for t in Analytic().to_prior(analytic_state))
    mm, mv = (t.detach() for t in MonteCarlo().to_prior(mc_state))
    assert am.shape == mm.shape and av.shape == mv.shape
    v = mc_state.value
    groups = v.shape[0] // mc_state.draws
    per = v.reshape(groups, mc_state.draws, v.shape[1], -1).transpose(1, 2)
    per = per.reshape(groups, v.shape[1], -1).numpy()
    for gi in range(groups):
        for ch in range(per.shape[1]):
            se_m, se_v = mc_tolerances(per[gi, ch], mc_state.draws * n_eff_per_draw)
            a_m, m_m, a_v, m_v = (float(t[gi, ch]) for t in (am, mm, av, mv))
            assert abs(a_m - m_m) < Z * se_m + 1e-12, (gi, ch, a_m, m_m)
            assert abs(a_v - m_v) < Z * se_v + 1e-12, (gi, ch, a_v, m_v)
    # The sample moments are what to_prior reports for a Sample.
    torch.testing.assert_close(mm, torch.tensor(per.mean(-1)))
    return am, av


def test_relu_conv_hop_agrees():
    torch.manual_seed(0)
    relu, conv = nn.ReLU(), nn.Conv2d(3, 4, 3, padding=0).double()
    moments, sample = _start()
    a, mc = Analytic(), MonteCarlo(draws=DRAWS)
    a_state = a.module(conv, a.module(relu, moments))
    with torch.no_grad():
        mc_state = mc.module(conv, mc.module(relu, sample))
    assert isinstance(mc_state, Sample) and mc_state.draws == DRAWS
    assert tuple(mc_state.value.shape[2:]) == a_state.spatial == (6, 6)
    _compare(a_state, mc_state, n_eff_per_draw=4)  # output positions 3 apart are independent
    # The ReLU matters: moments without it are clearly different from the agreed ones.
    no_relu = a.conv(conv, moments)
    assert (no_relu.mean - a_state.mean).abs().max() > 0.3


@pytest.mark.parametrize(
    "pool", [nn.AvgPool2d(2), nn.AvgPool2d(3, stride=3), nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((2, 2))]
)
def test_relu_avg_pool_agrees(pool):
    moments, sample = _start(spatial=(12, 12), seed=1)
    a, mc = Analytic(), MonteCarlo(draws=DRAWS)
    a_state = a.module(pool, a.module(nn.ReLU(), moments))
    mc_state = mc.module(pool, mc.module(nn.ReLU(), sample))
    assert a_state.spatial == tuple(mc_state.value.shape[2:])
    _compare(a_state, mc_state, n_eff_per_draw=math.prod(a_state.spatial))  # disjoint windows


def test_max_pool_on_gaussian_agrees():
    moments, sample = _start(spatial=(8, 8), seed=2)
    pool = nn.MaxPool2d(2)
    a_state = Analytic().module(pool, moments)
    mc_state = MonteCarlo(draws=DRAWS).module(pool, sample)
    assert a_state.spatial == (4, 4)
    _compare(a_state, mc_state, n_eff_per_draw=16)


def test_residual_add_and_channel_padding_agree():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=0).double()
    a, mc = Analytic(), MonteCarlo(draws=DRAWS)
    m1, s1 = _start(spatial=(8, 8), seed=3)
    m2, s2 = _start(spatial=(6, 6), seed=4)  # an independent shortcut branch of the output's size
    a_sum = a.add(a.module(conv, a.module(nn.ReLU(), m1)), a.module(nn.ReLU(), m2))
    with torch.no_grad():
        mc_sum = mc.add(mc.module(conv, mc.module(nn.ReLU(), s1)), mc.module(nn.ReLU(), s2))
    assert isinstance(mc_sum, Sample)
    am, av = _compare(a_sum, mc_sum, n_eff_per_draw=4)
    # Means and variances of independent summands add.
    b1 = a.module(conv, a.module(nn.ReLU(), m1))
    b2 = a.module(nn.ReLU(), m2)
    torch.testing.assert_close(am, b1.mean + b2.mean)
    torch.testing.assert_close(av, b1.var + b2.var)
    # Zero channel padding (the ResNet option-A shortcut).
    a_pad = a.pad_channels(a_sum, 1, 2)
    mc_pad = mc.pad_channels(mc_sum, 1, 2)
    pm, pv = _compare(a_pad, mc_pad, n_eff_per_draw=4)
    assert pm.shape[-1] == 6
    assert torch.all(pm[:, [0, 4, 5]] == 0) and torch.all(pv[:, [0, 4, 5]] == 0)
    torch.testing.assert_close(pm[:, 1:4], am)


def test_after_norm_conventions():
    """official: pre-normalization posterior, no gamma/beta; analytic: normalized-and-affine moments."""
    layer = bkn.BatchKalmanNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        layer.bias.copy_(torch.tensor([1.0, 0.0, -3.0]))
    mean = torch.tensor([[4.0, -2.0, 0.5]], dtype=torch.float64)
    var = torch.tensor([[9.0, 0.25, 2e-5]], dtype=torch.float64)
    layer.posterior = (mean, var)
    am = Analytic().after_norm(layer, (5, 5))
    torch.testing.assert_close(am.mean, layer.bias.detach().view(1, 3).double())
    gamma = layer.weight.detach().view(1, 3).double()
    torch.testing.assert_close(am.var, gamma**2 * var / (var + layer.eps))
    assert am.spatial == (5, 5)
    torch.manual_seed(0)
    s = MonteCarlo(draws=DRAWS).after_norm(layer, (5, 5))
    assert isinstance(s, Sample) and tuple(s.value.shape) == (DRAWS, 3, 5, 5)
    m = s.moments()
    n = DRAWS * 25
    assert torch.all((m.mean - mean).abs() < Z * (var / n).sqrt())
    assert torch.all((m.var / var - 1).abs() < Z * math.sqrt(2 / n))
    one = MonteCarlo().after_norm(layer, (5, 5))  # the official code: one draw per group
    assert one.draws == 1 and tuple(one.value.shape) == (1, 3, 5, 5)


def test_transition_registry():
    assert isinstance(transitions.get("official"), MonteCarlo)
    assert isinstance(transitions.get("analytic"), Analytic)
    assert transitions.get("identity") is None
    assert transitions.get("official", draws=7).draws == 7


# -- the chain built by bkn.convert ------------------------------------------------------------


def _plain_chain(channels=(3, 4, 5, 6)):
    c0, c1, c2, c3 = channels
    return nn.Sequential(
        nn.Conv2d(c0, c1, 3, padding=0),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=0),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.Conv2d(c2, c3, 3, padding=0),
        nn.BatchNorm2d(c3),
    ).double()


def _record_priors(model):
    """Wrap each BKN layer's prior provider to keep what it returned."""
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, bkn.layers._BatchKalmanNorm) and m.prior_provider is not None:

            def wrap(orig=m.prior_provider, name=name):
                prior = orig()
                seen[name] = None if prior is None else (prior[0].detach().clone(), prior[1].detach().clone())
                seen[name + ".requires_grad"] = prior is not None and prior[0].requires_grad
                return prior

            m.prior_provider = wrap
    return seen


def _posteriors(model):
    return {
        name: (m.posterior[0].detach().clone(), m.posterior[1].detach().clone())
        for name, m in model.named_modules()
        if isinstance(m, bkn.layers._BatchKalmanNorm)
    }


def test_chain_analytic_is_the_closed_form_of_previous_posterior():
    torch.manual_seed(0)
    model = bkn.convert(_plain_chain(), "bkn", transition="analytic", p=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bkn.BatchKalmanNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    seen = _record_priors(model)
    x = torch.randn(4, 3, 14, 14, dtype=torch.float64)
    model(x).sum().backward()
    post = _posteriors(model)
    assert seen["4.requires_grad"] and seen["7.requires_grad"]  # priors are differentiable
    a = Analytic()
    assert seen["1"] is None and not model[1].prior_used
    assert model[4].prior_used and model[7].prior_used
    for norm_i, conv_i, spatial in ((1, 3, (12, 12)), (4, 6, (10, 10))):
        torch.testing.assert_close(model[norm_i].posterior[0].detach(), post[str(norm_i)][0])
        expected = a.conv(model[conv_i], a.relu(a.after_norm(model[norm_i], spatial)))
        got = seen[str(norm_i + 3)]
        torch.testing.assert_close(got[0], expected.mean.detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[1], expected.var.detach(), rtol=1e-10, atol=1e-10)


def test_chain_official_agrees_with_analytic_rules_on_pre_norm_posterior():
    """With many draws the official transition is the analytic ReLU/conv rules applied to the
    previous layer's pre-normalization posterior (the official code skips gamma/beta)."""
    torch.manual_seed(0)
    model = bkn.convert(_plain_chain(), "bkn", transition="official", draws=DRAWS, p=0.5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, bkn.BatchKalmanNorm2d):
                m.weight.uniform_(0.5, 1.5)  # gamma/beta must NOT enter the official prior
                m.bias.uniform_(-1, 1)
    seen = _record_priors(model)
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    post = _posteriors(model)
    a = Analytic()
    for norm_i, conv_i, spatial in ((1, 3, (8, 8)), (4, 6, (6, 6))):
        expected = a.conv(model[conv_i], a.relu(Moments(*post[str(norm_i)], spatial)))
        got_m, got_v = seen[str(norm_i + 3)]
        out_side = spatial[0] - 2
        n_eff = DRAWS * math.ceil(out_side / 3) ** 2
        # Tolerances from the analytic variance (the MC sample's own spread) and a Gaussian 4th moment
        # inflated 2x for the rectified, non-Gaussian conv output.
        se_m = (expected.var / n_eff).sqrt()
        se_v = expected.var * math.sqrt(2 * 2 / n_eff)
        assert torch.all((got_m - expected.mean).abs() < Z * se_m), (got_m, expected.mean)
        assert torch.all((got_v - expected.var).abs() < Z * se_v), (got_v, expected.var)
    # ... and the analytic transition of the same layer would differ (gamma/beta are used there).
    layer_post = bkn.BatchKalmanNorm2d(4, dtype=torch.float64)
    layer_post.load_state_dict(model[1].state_dict())
    layer_post.posterior = post["1"]
    analytic = a.conv(model[3], a.relu(a.after_norm(layer_post, (8, 8))))
    assert (analytic.mean - seen["4"][0]).abs().max() > 0.1


def test_chain_identity_prior_is_previous_posterior():
    model = bkn.convert(_plain_chain((3, 4, 4, 4)), "bkn", transition="identity", p=0.5)
    seen = _record_priors(model)
    model(torch.randn(2, 3, 9, 9, dtype=torch.float64))
    post = _posteriors(model)
    assert seen["1"] is None
    torch.testing.assert_close(seen["4"][0], post["1"][0])
    torch.testing.assert_close(seen["4"][1], post["1"][1])
    torch.testing.assert_close(seen["7"][0], post["4"][0])
    assert model[7].prior_used


@pytest.mark.parametrize("transition", ["official", "analytic"])
def test_chain_priors_per_group(transition):
    """With group_size, each group gets its own prior row, from its own posterior."""
    torch.manual_seed(0)
    model = bkn.convert(_plain_chain(), "bkn", transition=transition, group_size=2, p=0.5)
    seen = _record_priors(model)
    model(torch.randn(6, 3, 10, 10, dtype=torch.float64))
    assert tuple(seen["4"][0].shape) == (3, 5) and tuple(seen["7"][1].shape) == (3, 6)
    assert tuple(model[7].posterior[0].shape) == (3, 6)
    # Different groups, different priors.
    assert (seen["4"][0][0] - seen["4"][0][1]).abs().max() > 1e-6
