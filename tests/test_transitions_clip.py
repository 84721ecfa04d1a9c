"""The clipped-Gaussian rule (ReLU6, Hardtanh) of the analytic transition, against quadrature and Monte-Carlo."""

from __future__ import annotations

import pytest
import torch
from scipy import integrate, stats
from torch import nn

from bkn.transitions import Analytic, Moments, MonteCarlo, Sample
from bkn.transitions.analytic import clip_moments, relu_moments


def _quadrature(mu: float, sigma: float, low: float, high: float) -> tuple[float, float]:
    def moment(k):
        f = lambda x: min(max(x, low), high) ** k * stats.norm.pdf(x, mu, sigma)  # noqa: E731
        points = [p for p in (low, high) if abs(p - mu) < 12 * sigma]
        return integrate.quad(f, mu - 12 * sigma, mu + 12 * sigma, points=points or None, limit=200)[0]

    m1 = moment(1)
    return m1, moment(2) - m1 * m1


@pytest.mark.parametrize(
    "mu,sigma,low,high",
    [(0.0, 1.0, 0.0, 6.0), (3.0, 2.0, 0.0, 6.0), (7.0, 0.5, 0.0, 6.0), (-2.0, 1.5, 0.0, 6.0), (0.3, 0.8, -1.0, 1.0)],
)
def test_clip_moments_vs_quadrature(mu, sigma, low, high):
    m, v = clip_moments(
        torch.tensor([mu], dtype=torch.float64), torch.tensor([sigma**2], dtype=torch.float64), low, high
    )
    qm, qv = _quadrature(mu, sigma, low, high)
    assert m.item() == pytest.approx(qm, rel=1e-7, abs=1e-9)
    assert v.item() == pytest.approx(qv, rel=1e-6, abs=1e-9)


def test_clip_with_a_far_upper_bound_is_relu():
    mean, var = torch.randn(3, 4, dtype=torch.float64), 0.5 + torch.rand(3, 4, dtype=torch.float64)
    for got, want in zip(clip_moments(mean, var, 0.0, 1e3), relu_moments(mean, var)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("module", [nn.ReLU6(), nn.Hardtanh(-0.5, 2.0)])
def test_analytic_clip_module_agrees_with_monte_carlo(module):
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 3, generator=g, dtype=torch.float64) * 2
    var = 0.5 + 4 * torch.rand(1, 3, generator=g, dtype=torch.float64)
    analytic = Analytic().module(module, Moments(mean, var, (8, 8)))
    n = 400_000
    z = torch.randn(n, 3, generator=g, dtype=torch.float64) * var.sqrt() + mean
    mc = MonteCarlo().module(module, Sample(z.t().reshape(1, 3, n, 1)))
    assert isinstance(mc, Sample)  # the surrogate goes through the module itself
    moments = mc.moments()
    y = mc.value.reshape(3, n)
    centred = y - y.mean(1, keepdim=True)
    var = centred.square().mean(1)
    se_mean = (var / n).sqrt()  # standard errors of the sample mean and variance, from the sample itself
    se_var = ((centred**4).mean(1) - var.square()).clamp_min(0).div(n).sqrt()
    assert torch.all((moments.mean - analytic.mean).abs() < 5 * se_mean)
    assert torch.all((moments.var - analytic.var).abs() < 5 * se_var)
