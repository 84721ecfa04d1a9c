"""Batch Renormalization (docs/design.md §6), bkn.layers.renorm: rmax = 1, dmax = 0 is BN, clipping and
the stop-gradient through r and d, the numpy reference, micro-batch groups.

Helpers and references are in renorm_reference.py; the schedule and error messages are in
test_renorm_schedule_and_errors.py, inference, buffers, state dicts, copies and the property test in
test_renorm_state_and_properties.py.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from renorm_reference import (
    CLASSES,
    TORCH_BN,
    batch_shape,
    grads,
    randomize,
    reference_step,
    torch_reference,
)
from torch.func import functional_call

from bkn.layers.renorm import BatchRenorm2d

# Every test that takes ``path`` (conftest.path) runs on the compiled kernels and on the torch Functions.


# -- BN equivalence -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [0, 1, 2, 3])
@pytest.mark.parametrize("how", ["fixed", "schedule_warmup"])
def test_rmax1_dmax0_equals_batchnorm_training(path, spatial, how):
    dims = max(spatial, 1)
    kwargs = {"rmax": 1.0, "dmax": 0.0} if how == "fixed" else {}  # default schedule: (1, 0) at step 0
    layer = CLASSES[dims](3, **kwargs)
    bn = TORCH_BN[dims](3)
    randomize(layer, mean_scale=3.0)  # running estimates far from the batch: r, d would matter
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    x = torch.randn(batch_shape(spatial, n=6)) * 2 + 0.5
    grad = torch.randn_like(x)
    y, (gx, gw, gb) = grads(layer, x, grad, [layer.weight, layer.bias])
    y_bn, (gx_bn, gw_bn, gb_bn) = grads(bn, x, grad, [bn.weight, bn.bias])
    torch.testing.assert_close(y, y_bn, atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gx_bn, atol=1e-6, rtol=0)
    torch.testing.assert_close(gw, gw_bn, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gb, gb_bn, atol=1e-5, rtol=1e-6)
    r, d = layer.last_rd
    assert torch.equal(r, torch.ones(1, 3)) and torch.equal(d.abs(), torch.zeros(1, 3))
    # The effective statistics are then BN's batch moments (biased variance).
    dims_ = [0] + list(range(2, x.dim()))
    mean, var = layer.last_stats
    torch.testing.assert_close(mean[0], x.mean(dims_), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(var[0], x.var(dims_, unbiased=False), atol=1e-5, rtol=1e-5)


def test_channels_last_input_matches_contiguous(path):
    layer = BatchRenorm2d(4, rmax=2.0, dmax=1.0)
    randomize(layer)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 4, 5, 3)
    grad = torch.randn_like(x)
    y, gs = grads(layer, x, grad, [layer.weight, layer.bias])
    cl = torch.channels_last
    y2, gs2 = grads(twin, x.to(memory_format=cl), grad.to(memory_format=cl), [twin.weight, twin.bias])
    torch.testing.assert_close(y2, y, atol=1e-6, rtol=1e-6)
    for a, b in zip(gs2, gs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(twin.running_std, layer.running_std)


# -- clipping and stop-gradient --------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 2])
def test_clipped_r_d_sit_at_their_bounds(path, group_size):
    layer = BatchRenorm2d(5, rmax=1.5, dmax=0.5, group_size=group_size).double()
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([10.0, -10.0, 0.0, 0.0, 0.0]))
        layer.running_std.copy_(torch.tensor([1.0, 1.0, 100.0, 0.01, 1.0]))
        layer.sync_running_var()
    x = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    layer(x)
    r, d = layer.last_rd
    groups = 4 // (group_size or 4)
    assert r.shape == d.shape == (groups, 5)
    assert torch.all(d[:, 0] == -0.5) and torch.all(d[:, 1] == 0.5)
    assert torch.all(r[:, 2] == 1 / 1.5) and torch.all(r[:, 3] == 1.5)
    assert torch.all(r <= 1.5) and torch.all(r >= 1 / 1.5) and torch.all(d.abs() <= 0.5)
    assert not r.requires_grad and not d.requires_grad


def _clipping_layer(group_size=None, momentum=0.1):
    """Float64 layer whose r and d are clipped (with margin) in every channel and group."""
    layer = BatchRenorm2d(4, rmax=1.25, dmax=0.25, group_size=group_size, momentum=momentum).double()
    randomize(layer)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))
        layer.running_std.copy_(torch.tensor([0.1, 10.0, 10.0, 0.1]))
        layer.sync_running_var()
    return layer


@pytest.mark.parametrize("group_size", [None, 2])
def test_input_gradient_treats_clipped_r_d_as_constants(path, group_size):
    layer = _clipping_layer(group_size)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    x = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    grad = torch.randn_like(x)
    groups = 4 // (group_size or 4)
    y, gs = grads(layer, x, grad, [layer.weight, layer.bias])
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    ref = lambda t: torch_reference(t, w, b, mu, sigma, 1.25, 0.25, layer.eps, groups)  # noqa: E731
    y_ref, gs_ref = grads(ref, x, grad, [w, b])
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for a, e in zip(gs, gs_ref):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    r, d = layer.last_rd
    assert torch.all(
        torch.isclose(r, torch.tensor(1.25, dtype=torch.float64))
        | torch.isclose(r, torch.tensor(0.8, dtype=torch.float64))
    )
    assert torch.all(d.abs() == 0.25)


@pytest.mark.parametrize("group_size", [None, 2])
def test_gradcheck_with_clipping_active(path, group_size):
    # momentum 0: the running estimates (hence r, d) do not move between gradcheck's calls.
    layer = _clipping_layer(group_size, momentum=0.0)
    x = torch.randn(4, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    # Gradients w.r.t. x, weight and bias: a functional call with the parameters replaced.
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: functional_call(layer, {"weight": w_, "bias": b_}, (x_,)), (x, w, b), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("group_size", [None, 2])
def test_unclipped_r_d_carry_no_gradient(path, group_size):
    """Without clipping r, d depend on x; the layer's gradient must ignore that dependence."""
    layer = BatchRenorm2d(3, rmax=math.inf, dmax=math.inf, group_size=group_size).double()
    randomize(layer)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    grad = torch.randn_like(x)
    groups = 4 // (group_size or 4)
    y, (gx,) = grads(layer, x, grad, [])

    def reference(stop_grad):
        w, b = layer.weight.detach(), layer.bias.detach()
        return lambda t: torch_reference(t, w, b, mu, sigma, math.inf, math.inf, layer.eps, groups, stop_grad=stop_grad)

    stopped, through = reference(True), reference(False)
    y_ref, (gx_ref,) = grads(stopped, x, grad, [])
    _, (gx_through,) = grads(through, x, grad, [])
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=1e-12)
    assert (gx_through - gx_ref).abs().max() > 1e-3  # the test could tell the difference
    # Unclipped: training output = inference output with the pre-step running estimates.
    w, b = layer.weight.detach(), layer.bias.detach()
    per = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    expected = per(w) * (x - per(mu)) / per(sigma) + per(b)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)


# -- independent numpy computation ------------------------------------------------------------


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("spatial", [0, 2])
def test_forward_and_running_updates_match_numpy(path, group_size, affine, spatial, rng):
    dims = max(spatial, 1)
    rmax, dmax, momentum, eps = 1.3, 0.4, 0.2, 1e-3
    layer = CLASSES[dims](
        3, rmax=rmax, dmax=dmax, momentum=momentum, eps=eps, affine=affine, group_size=group_size
    ).double()
    randomize(layer)
    w = layer.weight.detach().numpy().copy() if affine else np.ones(3)
    b = layer.bias.detach().numpy().copy() if affine else np.zeros(3)
    mu, sigma = layer.running_mean.numpy().copy(), layer.running_std.numpy().copy()
    groups = 4 // (group_size or 4)
    for step in range(5):
        x = rng.normal(0.7 * step, 1.0 + step, size=batch_shape(spatial))
        y = layer(torch.from_numpy(x))
        y_ref, mu, sigma, r, d, m, sb = reference_step(x, w, b, mu, sigma, rmax, dmax, eps, momentum, groups)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.running_mean.numpy(), mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_std.numpy(), sigma, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), sigma**2 - eps, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.last_rd[0].numpy(), r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.last_rd[1].numpy(), d, rtol=1e-12, atol=1e-12)
        # Effective statistics (docs/design.md §9): mean m_o - d sigma_B / r, var (sigma_B / r)^2 (here minus eps).
        mean_eff, var_eff = layer.last_stats
        np.testing.assert_allclose(mean_eff.numpy(), m - d * sb / r, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var_eff.numpy(), (sb / r) ** 2 - eps, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == step + 1


def test_effective_statistics_reproduce_the_output(path):
    layer = BatchRenorm2d(3, rmax=1.5, dmax=1.0, group_size=2)
    randomize(layer)
    x = torch.randn(4, 3, 4, 4) * 3 + 1
    y = layer(x).detach()
    mean, var = layer.last_stats
    assert mean.shape == var.shape == (2, 3) and not mean.requires_grad
    xg = x.view(2, 2, 3, 4, 4)
    w, b = layer.weight.detach().view(1, 1, 3, 1, 1), layer.bias.detach().view(1, 1, 3, 1, 1)
    expected = w * (xg - mean.view(2, 1, 3, 1, 1)) / torch.sqrt(var.view(2, 1, 3, 1, 1) + layer.eps) + b
    torch.testing.assert_close(y, expected.view_as(x), atol=1e-5, rtol=1e-5)


def test_single_pass_moments_fall_back_when_the_mean_dwarfs_the_std(path):
    """|mean| >> std: the single pass (sum(x x) - mean sum(x)) would lose every digit of the variance."""
    from bkn.layers._moments import moments_from_sums, shifted_sums

    x = torch.randn(8, 4, 6, 6) * 0.01 + 300.0
    truth = x.double().var((0, 2, 3), unbiased=False)
    layer = BatchRenorm2d(4, rmax=1.0, dmax=0.0, eps=1e-12)
    layer(x)
    mean, var = layer.last_stats  # with r = 1, d = 0: the batch moments
    torch.testing.assert_close(var[0].double(), truth, rtol=1e-4, atol=0)
    torch.testing.assert_close(mean[0].double(), x.double().mean((0, 2, 3)), rtol=1e-6, atol=0)
    # The single pass on its own is far off here: the test can tell.
    zero = torch.zeros(4)
    naive = moments_from_sums(*shifted_sums(x, zero), zero, x.numel() // 4)[1]
    assert ((naive.double() - truth).abs() / truth).max() > 1e-2


# -- groups -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [0, 2])
def test_groups_equal_separate_layers_per_chunk(path, spatial):
    dims = max(spatial, 1)
    g, n = 2, 6
    layer = CLASSES[dims](3, rmax=1.4, dmax=0.6, group_size=g)
    randomize(layer, mean_scale=0.5)
    singles = [copy.deepcopy(layer) for _ in range(n // g)]
    for s in singles:
        s.group_size = None
    x = torch.randn(batch_shape(spatial, n=n)) * 1.5 + 0.3
    grad = torch.randn_like(x)
    y, (gx, gw, gb) = grads(layer, x, grad, [layer.weight, layer.bias])
    parts = [
        grads(s, x[i * g : (i + 1) * g], grad[i * g : (i + 1) * g], [s.weight, s.bias]) for i, s in enumerate(singles)
    ]
    torch.testing.assert_close(y, torch.cat([p[0] for p in parts]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gx, torch.cat([p[1][0] for p in parts]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, sum(p[1][1] for p in parts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb, sum(p[1][2] for p in parts), atol=1e-5, rtol=1e-5)
    # Running estimates move towards the mean over groups: the average of the separate layers'.
    torch.testing.assert_close(layer.running_mean, sum(s.running_mean for s in singles) / len(singles))
    torch.testing.assert_close(layer.running_std, sum(s.running_std for s in singles) / len(singles))
    r, d = layer.last_rd
    torch.testing.assert_close(r, torch.cat([s.last_rd[0] for s in singles]))
    torch.testing.assert_close(d, torch.cat([s.last_rd[1] for s in singles]))
