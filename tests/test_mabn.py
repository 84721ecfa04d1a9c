"""MABN (bkn.layers.mabn) against the paper's equations (Yan et al. 2020, eqs. of MABN's forward and backward).

The reference below is written from the paper in numpy float64, with plain lists for the
windows (the layer uses ring buffers), and run over 14 training steps that cross the burn-in,
the window, the warm-up and the start of the renorm factor's clipping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bkn import norms
from bkn.layers.mabn import CenteredConv2d, MovingAverageBatchNorm1d, MovingAverageBatchNorm2d


class PaperMABN:
    """Per group j and channel c: chi_t = E[x^2]; forward divides by the SMA of chi over the last m iterations,
    backward subtracts z times the SMA of E[g z]; r = sqrt(chi + eps) / sqrt(running + eps), clipped."""

    def __init__(self, channels, m, warmup, renorm_after, rmax, momentum, eps):
        self.m, self.warmup, self.renorm_after, self.rmax = m, warmup, renorm_after, rmax
        self.momentum, self.eps = momentum, eps
        self.running = np.ones(channels)
        self.chi, self.gz = [], []  # one (G, C) array per iteration
        self.t = 0

    def _smoothed(self, history, current):
        if self.t > self.m and self.t >= self.warmup:
            return np.mean(history[-self.m :], axis=0)
        return current

    def step(self, x, dy, gamma, beta, groups):
        self.t += 1
        n = x.shape[0]
        xg = x.reshape(groups, n // groups, *x.shape[1:])  # (G, g, C, H, W)
        chi = (xg**2).mean(axis=(1, 3, 4))
        self.chi.append(chi)
        var = self._smoothed(self.chi, chi)
        sigma = np.sqrt(var + self.eps)[:, None, :, None, None]
        z = xg / sigma
        if self.t <= max(self.renorm_after, self.warmup):
            r = np.ones_like(var)
        else:
            r = np.clip(np.sqrt(var + self.eps) / np.sqrt(self.running + self.eps), 1 / self.rmax, self.rmax)
        r5 = r[:, None, :, None, None]
        y = gamma[None, None, :, None, None] * r5 * z + beta[None, None, :, None, None]
        self.running = (1 - self.momentum) * self.running + self.momentum * var.mean(0)
        dyg = dy.reshape(xg.shape)
        g = dyg * gamma[None, None, :, None, None] * r5
        gz = (g * z).mean(axis=(1, 3, 4))
        self.gz.append(gz)
        mean_gz = self._smoothed(self.gz, gz)
        dx = (g - z * mean_gz[:, None, :, None, None]) / sigma
        dgamma = (dyg * r5 * z).sum(axis=(0, 1, 3, 4))
        dbeta = dyg.sum(axis=(0, 1, 3, 4))
        return y.reshape(x.shape), dx.reshape(x.shape), dgamma, dbeta, var, r


@pytest.mark.parametrize("group_size", [2, None])
def test_mabn_equals_the_papers_equations_over_fourteen_steps(group_size):
    m, warmup, renorm_after, rmax, momentum, eps = 3, 5, 7, 1.1, 0.3, 1e-5
    channels, n = 3, 4
    layer = MovingAverageBatchNorm2d(
        channels,
        group_size=group_size,
        window=m,
        warmup_iters=warmup,
        renorm_after=renorm_after,
        rmax=rmax,
        momentum=momentum,
        eps=eps,
    ).double()
    groups = n // (group_size or n)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(channels, generator=gen, dtype=torch.float64))
        layer.bias.copy_(0.3 * torch.randn(channels, generator=gen, dtype=torch.float64))
    ref = PaperMABN(channels, m, warmup, renorm_after, rmax, momentum, eps)
    clipped = set()
    for step in range(14):
        scale = 0.5 + 2.0 * torch.rand((), generator=gen, dtype=torch.float64)  # r leaves [1/rmax, rmax]
        x = (scale * torch.randn(n, channels, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
        dy = torch.randn(n, channels, 3, 3, generator=gen, dtype=torch.float64)
        y = layer.train()(x)
        y.backward(dy)
        gamma, beta = layer.weight.detach().numpy(), layer.bias.detach().numpy()
        y_ref, dx_ref, dg_ref, db_ref, var, r = ref.step(x.detach().numpy(), dy.numpy(), gamma, beta, groups)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12, err_msg=f"y, step {step}")
        np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-10, atol=1e-12, err_msg=f"dx, step {step}")
        np.testing.assert_allclose(layer.weight.grad.numpy(), dg_ref, rtol=1e-10, err_msg=f"dgamma, step {step}")
        np.testing.assert_allclose(layer.bias.grad.numpy(), db_ref, rtol=1e-10, err_msg=f"dbeta, step {step}")
        np.testing.assert_allclose(layer.running_var.numpy(), ref.running, rtol=1e-10, err_msg=f"running, {step}")
        mean, eff_var = layer.last_stats
        assert torch.equal(mean, torch.zeros_like(mean))
        np.testing.assert_allclose(eff_var.numpy(), (var + eps) / r**2 - eps, rtol=1e-9)
        clipped |= {step for value in r.ravel() if np.isclose(abs(np.log(value)), np.log(rmax))}
        layer.weight.grad = layer.bias.grad = None
    assert clipped and min(clipped) >= renorm_after, "the run must reach the clipped renorm factor, after renorm_after"


def test_mabn_gradcheck_in_burn_in_where_its_backward_is_the_exact_gradient():
    """Before the window and the renorm factor (r = 1) MABN is y = gamma x / sqrt(E[x^2] + eps) + beta,
    and its backward that function's exact gradient."""
    layer = MovingAverageBatchNorm2d(3, group_size=2, window=4, warmup_iters=10**6).double().train()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.2 * torch.randn(3, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        from bkn.layers.mabn import _MABNFunction

        layer.num_batches_tracked.add_(1)
        layer._prepare_history(2, 4)
        return _MABNFunction.apply(x, w, b, layer, 2, layer.num_batches_tracked.clone())

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_mabn_inference_is_x_over_the_running_rms_and_the_window_follows_the_group():
    layer = norms.create("mabn", 4, group_size=2, spatial_dims=0)
    assert isinstance(layer, MovingAverageBatchNorm1d)
    assert layer.window_for(8) == 16  # real_batch_size 32 / group 2: the authors' real_B / B
    layer(torch.randn(8, 4))
    assert tuple(layer.buffer_x2.shape) == (16, 4, 4)
    layer.eval()
    x = torch.randn(5, 4)
    expected = layer.weight * x / (layer.running_var + layer.eps).sqrt() + layer.bias
    torch.testing.assert_close(layer(x), expected)
    state = layer.state_dict()
    fresh = norms.create("mabn", 4, group_size=2, spatial_dims=0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.buffer_x2, layer.buffer_x2)


def test_mabn_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="track_running_stats"):
        MovingAverageBatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="window must be a positive int"):
        MovingAverageBatchNorm2d(4, window=0)


def test_centered_conv_is_a_conv_with_weights_centred_per_output_channel():
    torch.manual_seed(0)
    conv = CenteredConv2d(3, 5, 3, padding=1, bias=True)
    x = torch.randn(2, 3, 6, 6)
    w = conv.weight.detach()
    centred = w - w.reshape(5, -1).mean(1).view(5, 1, 1, 1)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, centred, conv.bias, padding=1))
    assert torch.allclose(centred.sum((1, 2, 3)), torch.zeros(5), atol=1e-6)
