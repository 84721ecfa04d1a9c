"""Cross-Iteration BN (bkn.layers.cross_iteration) against the paper's equations (Yao et al. 2021, eqs. 6-9).

The reference is numpy float64 with a 1x1 convolution feeding the norm, so that the derivatives
of the statistics with respect to the weight have a closed form (d mu_c / d W_ci = E[u_i],
d nu_c / d W_ci = 2 E[x_c u_i] for the convolution's input u); the layer gets them from autograd.
The weights move by large random steps between iterations, so that windows are compensated,
and some compensated variances go negative (dropped by the authors' rule, clamped by the paper's).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bkn import norms
from bkn.layers.cross_iteration import CrossIterationBatchNorm2d


class PaperCBN:
    def __init__(self, window, burnin, rho, invalid, eps):
        self.window, self.burnin, self.rho, self.invalid, self.eps = window, burnin, rho, invalid, eps
        self.past = []  # newest first: (mu, nu, dmu, dnu, W), mu/nu (G, C), dmu/dnu (G, C, Cin)
        self.t = 0
        self.invalid_seen = 0

    def step(self, u, w, dy, gamma, beta, groups):
        self.t += 1
        n = u.shape[0]
        x = np.einsum("ci,nihw->nchw", w, u)
        ug = u.reshape(groups, n // groups, *u.shape[1:])
        xg = x.reshape(groups, n // groups, *x.shape[1:])
        mu0, nu0 = xg.mean(axis=(1, 3, 4)), (xg**2).mean(axis=(1, 3, 4))
        if self.t <= self.burnin:
            mu, nu, count = mu0, nu0, np.ones_like(mu0)
        else:
            dmu = np.broadcast_to(ug.mean(axis=(1, 3, 4))[:, None, :], (groups, w.shape[0], w.shape[1]))
            dnu = 2 * np.einsum("jgchw,jgihw->jci", xg, ug) / (xg.shape[1] * xg.shape[3] * xg.shape[4])
            mus, nus = [mu0], [nu0]
            for mu_p, nu_p, dmu_p, dnu_p, w_p in self.past:  # eq. 6-7: first-order Taylor compensation
                mus.append(mu_p + self.rho * (dmu_p * (w - w_p)).sum(-1))
                nus.append(nu_p + self.rho * (dnu_p * (w - w_p)).sum(-1))
            mus, nus = np.stack(mus), np.stack(nus)
            bad = nus - mus**2 < 0
            bad[0] = False
            self.invalid_seen += int(bad.sum())
            if self.invalid == "clamp":  # eq. 8: nu is at least mu^2
                nus = np.maximum(nus, mus**2)
                keep = np.ones_like(nus)
            else:
                keep = (~bad).astype(float)
            count = keep.sum(0)
            mu, nu = (keep * mus).sum(0) / count, (keep * nus).sum(0) / count
            self.past = [(mu0, nu0, dmu, dnu, w.copy())] + self.past[: self.window - 1]
        var = nu - mu**2  # eq. 9
        s = np.sqrt(var + self.eps)[:, None, :, None, None]
        mu5 = mu[:, None, :, None, None]
        g5 = gamma[None, None, :, None, None]
        y = g5 * (xg - mu5) / s + beta[None, None, :, None, None]
        # backward: only the current statistics depend on x (each with weight 1 / count)
        dyg = dy.reshape(xg.shape)
        gh = dyg * g5
        values = xg.shape[1] * xg.shape[3] * xg.shape[4]
        dvar = (gh * (xg - mu5)).sum(axis=(1, 3, 4)) * -0.5 / (var + self.eps) ** 1.5
        dmu_bar = (-gh / s).sum(axis=(1, 3, 4)) - 2 * mu * dvar
        k5 = (count * values)[:, None, :, None, None]
        dx = gh / s + dmu_bar[:, None, :, None, None] / k5 + dvar[:, None, :, None, None] * 2 * xg / k5
        dgamma = (dyg * (xg - mu5) / s).sum(axis=(0, 1, 3, 4))
        return y.reshape(x.shape), dx.reshape(x.shape), dgamma, dyg.sum(axis=(0, 1, 3, 4)), (mu, var)


@pytest.mark.parametrize("invalid", ["drop", "clamp"])
def test_cbn_equals_the_papers_equations_over_ten_steps(invalid):
    window, burnin, rho, eps, groups = 3, 2, 1.0, 1e-5, 2
    cin, c, n = 2, 3, 4
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(cin, c, 1, bias=False).double()
    layer = CrossIterationBatchNorm2d(c, group_size=n // groups, window=window, burnin=burnin, invalid=invalid)
    layer = layer.double().train()
    layer.wire(conv, "test")
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(c, generator=gen, dtype=torch.float64))
        layer.bias.copy_(0.3 * torch.randn(c, generator=gen, dtype=torch.float64))
    ref = PaperCBN(window, burnin, rho, invalid, eps)
    for step in range(10):
        u = 1.0 + torch.randn(n, cin, 3, 3, generator=gen, dtype=torch.float64)
        dy = torch.randn(n, c, 3, 3, generator=gen, dtype=torch.float64)
        w = conv.weight.detach()[:, :, 0, 0].numpy().copy()
        x = conv(u)
        y = layer(x)
        dx, dgamma, dbeta = torch.autograd.grad(y, (x, layer.weight, layer.bias), dy)
        gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
        y_ref, dx_ref, dg_ref, db_ref, (mu, var) = ref.step(u.numpy(), w, dy.numpy(), gamma, beta, groups)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-9, atol=1e-11, err_msg=f"y, step {step}")
        np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-8, atol=1e-10, err_msg=f"dx, step {step}")
        np.testing.assert_allclose(dgamma.numpy(), dg_ref, rtol=1e-9, err_msg=f"dgamma, step {step}")
        np.testing.assert_allclose(dbeta.numpy(), db_ref, rtol=1e-9, err_msg=f"dbeta, step {step}")
        np.testing.assert_allclose(layer.last_stats[0].numpy(), mu, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.last_stats[1].numpy(), var, rtol=1e-9, atol=1e-12)
        assert layer.last_used == (0 if step < burnin else min(step - burnin, window))
        with torch.no_grad():  # a large step, so that the compensation matters
            conv.weight.add_(0.8 * torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    assert ref.invalid_seen > 0, "the run must meet a window with a negative compensated variance"


def test_cbn_derivatives_through_a_strided_3x3_convolution_match_finite_differences():
    """The autograd derivatives the layer stores (d mu / d W, d nu / d W per group) on a general convolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1).double()
    layer = CrossIterationBatchNorm2d(3, group_size=2, window=2).double().train()
    layer.wire(conv, "test")
    u = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    layer(conv(u))
    _, _, dmu, dnu, _ = layer.history[0]

    def stats(weight):
        x = nn.functional.conv2d(u, weight, conv.bias, stride=2, padding=1).unflatten(0, (2, 2))
        return x.mean((1, 3, 4)), (x * x).mean((1, 3, 4))

    w = conv.weight.detach()
    for index in [(0, 0, 0, 0), (1, 1, 2, 1), (2, 0, 1, 2)]:
        h = 1e-6
        plus, minus = w.clone(), w.clone()
        plus[index] += h
        minus[index] -= h
        (mu_p, nu_p), (mu_m, nu_m) = stats(plus), stats(minus)
        c = index[0]
        torch.testing.assert_close(dmu[(slice(None),) + index], (mu_p - mu_m)[:, c] / (2 * h), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(dnu[(slice(None),) + index], (nu_p - nu_m)[:, c] / (2 * h), rtol=1e-6, atol=1e-8)


def test_cbn_unwired_warns_once_and_is_plain_bn_of_the_group():
    layer = norms.create("cbn", 4, group_size=2)
    x = torch.randn(4, 4, 3, 3, requires_grad=True)
    with pytest.warns(UserWarning, match="trains without a convolution"):
        y = layer(x)
    reference = torch.cat([nn.functional.batch_norm(p, None, None, training=True) for p in x.split(2)])
    torch.testing.assert_close(y, reference)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per layer


def test_cbn_gradcheck_in_float64_with_a_window():
    """The layer's gradient (current statistics differentiable, compensated past ones constant) is
    the exact gradient of its forward as a function of x, gamma and beta, with the window in use."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 1, bias=False).double()
    layer = CrossIterationBatchNorm2d(3, group_size=2, window=2).double().train()
    layer.wire(conv, "test")
    for _ in range(3):  # fill the window
        layer(conv(torch.randn(4, 1, 2, 2, dtype=torch.float64)))
        with torch.no_grad():
            conv.weight.add_(0.1 * torch.randn_like(conv.weight))
    history = list(layer.history)
    u = torch.randn(4, 1, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(u):
        layer.history = list(history)  # every evaluation sees the same window
        return layer(conv(u))

    assert torch.autograd.gradcheck(f, (u,))
    assert layer.last_used == 2


def test_cbn_rejects_bad_options():
    with pytest.raises(ValueError, match="invalid must be one of"):
        CrossIterationBatchNorm2d(4, invalid="nope")
    with pytest.raises(ValueError, match="output channels"):
        CrossIterationBatchNorm2d(4).wire(nn.Conv2d(2, 5, 1), "x")


@pytest.mark.parametrize("dims", [1, 2])
def test_folded_weight_gradients_equal_autograd_per_group(dims):
    """The wired layer's one-call derivatives (groups as channel blocks of a grouped convolution's weight gradient)
    against one autograd pass per group, on a strided, dilated, grouped convolution with a bias."""
    from bkn.layers.cross_iteration import conv_weight_gradients, weight_gradients

    torch.manual_seed(0)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 6, 3, stride=2, padding=2, dilation=2, groups=2).double()
    u = torch.randn(6, 4, *([7] * dims), dtype=torch.float64)
    x = conv(u)
    groups = 3
    xg = x.unflatten(0, (groups, 2))
    dims_ = (1,) + tuple(range(3, xg.dim()))
    mu, nu = xg.mean(dims_), (xg * xg).mean(dims_)
    dmu, dnu = conv_weight_gradients(conv, u, x, groups)
    torch.testing.assert_close(dmu, weight_gradients(mu, conv.weight))
    torch.testing.assert_close(dnu, weight_gradients(nu, conv.weight))


def test_a_wired_layer_takes_the_folded_path(monkeypatch):
    import bkn.layers.cross_iteration as ci

    calls = []
    monkeypatch.setattr(ci, "weight_gradients", lambda *a: calls.append(a) or pytest.fail("autograd path taken"))
    conv = nn.Conv2d(2, 3, 3)
    layer = CrossIterationBatchNorm2d(3, group_size=2).train()
    layer.wire(conv, "test")
    layer(conv(torch.randn(4, 2, 5, 5)))
    assert layer.last_used == 0 and len(layer.history) == 1 and not calls


def test_a_wired_model_deep_copies_and_rewires_after_training_forwards():
    import copy

    model = nn.Sequential(nn.Conv2d(2, 3, 3), CrossIterationBatchNorm2d(3, group_size=2, burnin=1))
    model[1].wire(model[0], "test")
    for _ in range(2):  # one in burn-in, one with the window
        model(torch.randn(4, 2, 5, 5)).sum().backward()
    twin = copy.deepcopy(model)
    assert twin[1].source is twin[0] and len(twin[0]._forward_hooks) == 1
    twin(torch.randn(4, 2, 5, 5)).sum().backward()
    assert twin[1].last_used == 1 and len(model[1].history) == 1  # the copy's window is its own
    model[1].wire(None, "unwired in a test")
    assert len(model[0]._forward_hooks) == 0 and len(twin[0]._forward_hooks) == 1
