"""Elementwise activations in the analytic chain: moments by Gauss-Hermite quadrature through the
network's own module, checked against a fine-grid integral, by gradcheck, and in a converted
network (the layer after the activation gets its prior, in both transitions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bkn
from bkn.layers import _BatchKalmanNorm
from bkn.transitions.analytic import ELEMENTWISE, elementwise_moments

SMOOTH = (nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Mish(), nn.Sigmoid(), nn.Tanh(), nn.Softplus())
KINKED = (nn.Hardswish(), nn.Hardsigmoid(), nn.ELU(alpha=0.7), nn.CELU(), nn.SELU(), nn.LeakyReLU(0.2))


def _grid_moments(fn, mean: float, var: float) -> tuple[float, float]:
    """E fn(X), Var fn(X) for X ~ N(mean, var) by the trapezoid rule on 400,001 points over +-12 sd (float64)."""
    sd = math.sqrt(var)
    x = torch.linspace(mean - 12 * sd, mean + 12 * sd, 400_001, dtype=torch.float64)
    density = torch.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    f = fn(x.clone())
    first = torch.trapezoid(f * density, x).item()
    second = torch.trapezoid(f * f * density, x).item()
    return first, second - first * first


@pytest.mark.parametrize("fn", SMOOTH + KINKED, ids=lambda m: repr(m))
def test_quadrature_equals_a_fine_grid_integral(fn):
    means = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.5, 2.0, 4.0], dtype=torch.float64)
    variances = torch.tensor([0.01, 0.3, 1.0, 2.5, 6.0], dtype=torch.float64)
    mean, var = (t.reshape(-1) for t in torch.meshgrid(means, variances, indexing="ij"))
    got_mean, got_var = elementwise_moments(fn, mean, var)
    tol = 5e-4 if fn in SMOOTH else 1e-2  # measured worst: 3.1e-4 (tanh) and 4.6e-3 (kinks converge slowly)
    for m, v, a, b in zip(mean.tolist(), var.tolist(), got_mean.tolist(), got_var.tolist()):
        exact_mean, exact_var = _grid_moments(fn, m, v)
        assert a == pytest.approx(exact_mean, abs=tol * (1 + abs(exact_mean))), (m, v)
        assert b == pytest.approx(exact_var, abs=tol * (1 + exact_var)), (m, v)


def test_every_listed_activation_is_covered_here():
    assert {type(m) for m in SMOOTH + KINKED} == set(ELEMENTWISE)


def test_gradcheck_and_an_inplace_module():
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    var = (0.1 + torch.rand(2, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: elementwise_moments(nn.SiLU(), m, v), (mean, var))
    inplace = elementwise_moments(nn.Hardswish(inplace=True), mean, var)  # may write over its points
    for a, b in zip(inplace, elementwise_moments(nn.Hardswish(), mean, var)):
        torch.testing.assert_close(a, b)
    assert not torch.equal(mean, torch.zeros_like(mean))  # the inputs themselves are untouched


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        act,
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )


@pytest.mark.parametrize("transition", ["analytic", "official"])
@pytest.mark.parametrize("act", [nn.SiLU(inplace=True), nn.Hardswish(), nn.GELU()], ids=lambda m: type(m).__name__)
def test_the_layer_after_the_activation_gets_its_prior(transition, act):
    model = bkn.convert(_net(act), "bkn", transition=transition, group_size=2).train()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    rows = {r["layer"]: r for r in bkn.prior_report(model)}
    assert rows["4"]["last"] == "prior used", rows["4"]
    assert f"{type(act).__name__}(2)" in rows["4"]["path"]
    assert model[4].prior_used and model[1].posterior[1].requires_grad  # the prior's source is in the graph
    layers = [m for m in model.modules() if isinstance(m, _BatchKalmanNorm)]
    assert all(m.weight.grad is not None for m in layers)


def test_analytic_prior_through_silu_matches_the_population_closely():
    """The prior layer 4 is given after conv(SiLU(norm)), against the mean of the real activations
    of a large group (what the prior predicts)."""
    model = bkn.convert(_net(nn.SiLU()), "bkn", transition="analytic", group_size=512).train()
    seen = {}
    model[4].register_forward_pre_hook(lambda layer, args: seen.update(prior=layer.prior_provider()))
    with torch.no_grad():
        model[3].weight.mul_(0.5)
        x = torch.randn(512, 3, 8, 8)
        real = model[3](model[2](model[1](model[0](x))))  # the same group: layer 1's statistics are these
        model(x)
    mean, var = seen["prior"]
    # Independence across taps and channels is assumed (docs/design.md §4): the mean is close, the variance rougher.
    torch.testing.assert_close(mean.squeeze(0), real.mean((0, 2, 3)), atol=0.05, rtol=0.05)
    assert torch.all(var.squeeze(0) > 0.2 * real.var((0, 2, 3))) and torch.all(var.squeeze(0) < 5 * real.var((0, 2, 3)))


def test_official_surrogate_is_not_written_over_by_an_inplace_activation():
    """The chain evaluates lazily: a state read by two ops must come out of an in-place module unchanged."""
    from bkn.transitions import MonteCarlo, Sample

    t = MonteCarlo()
    value = torch.randn(2, 4, 3, 3)
    state = Sample(value.clone())
    out = t.module(nn.ReLU(inplace=True), state)
    assert torch.equal(state.value, value) and torch.equal(out.value, value.relu())
    out = t.module(nn.SiLU(inplace=True), state)
    assert torch.equal(state.value, value) and torch.allclose(out.value, nn.functional.silu(value))
