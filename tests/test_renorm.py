"""Batch Renormalization (spec section 2): bkn.layers.renorm."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from bkn.layers import _native
from bkn.layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, RenormSchedule

CLASSES = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


PATHS = ("compiled", "torch")


@contextlib.contextmanager
def use_path(name: str):
    """``compiled`` (bkn/csrc/fused_norm.cpp, the default on the CPU) or ``torch`` (the Python
    autograd Functions: the reference, the path on GPUs and the fallback)."""
    load = _native.load
    if name == "compiled" and load() is None:
        pytest.skip("the compiled kernels are off (BKN_NATIVE=0) or could not be built")
    if name != "compiled":
        _native.load = lambda: None
    try:
        yield name
    finally:
        _native.load = load


@pytest.fixture(params=PATHS)
def path(request):
    with use_path(request.param) as name:
        yield name


def _shape(spatial: int, n: int = 4, c: int = 3) -> tuple[int, ...]:
    return (n, c) + {0: (), 1: (5,), 2: (3, 4), 3: (2, 3, 2)}[spatial]


def _randomize(layer, seed: int = 0, mean_scale: float = 1.0, std_range=(0.5, 2.0)) -> None:
    """Random affine parameters and running estimates (running_var kept consistent)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(layer.num_features, generator=gen) * 1.5 + 0.25)
            layer.bias.copy_(torch.randn(layer.num_features, generator=gen))
        if getattr(layer, "running_std", None) is not None:
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=gen) * mean_scale)
            lo, hi = std_range
            layer.running_std.copy_(lo + (hi - lo) * torch.rand(layer.num_features, generator=gen))
            layer.sync_running_var()


# -- numpy and torch references ------------------------------------------------------------


def reference_step(x, w, b, mu, sigma, rmax, dmax, eps, momentum, groups):
    """Spec 2 in float64 numpy: output, new mu, new sigma, r, d, m_o, sigma_B for (G, C)."""
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    m = xg.mean(axis=(1, 3))
    v = xg.var(axis=(1, 3))
    sb = np.sqrt(v + eps)
    r = np.clip(sb / sigma, 1 / rmax, rmax)
    d = np.clip((m - mu) / sigma, -dmax, dmax)
    per = lambda a: a[:, None, :, None]  # noqa: E731
    y = ((xg - per(m)) / per(sb) * per(r) + per(d)) * w[None, None, :, None] + b[None, None, :, None]
    new_mu = mu + momentum * (m.mean(0) - mu)
    new_sigma = sigma + momentum * (sb.mean(0) - sigma)
    return y.reshape(x.shape), new_mu, new_sigma, r, d, m, sb


def torch_reference(x, w, b, mu, sigma, rmax, dmax, eps, groups, stop_grad=True):
    """Spec 2 with plain torch ops (differentiable); r, d constants when ``stop_grad``."""
    n, c = x.shape[:2]
    xg = x.reshape(groups, n // groups, c, -1)
    m = xg.mean(dim=(1, 3))
    v = xg.var(dim=(1, 3), unbiased=False)
    sb = torch.sqrt(v + eps)
    r = torch.clamp(sb / sigma, 1 / rmax, rmax)
    d = torch.clamp((m - mu) / sigma, -dmax, dmax)
    if stop_grad:
        r, d = r.detach(), d.detach()
    per = lambda a: a[:, None, :, None]  # noqa: E731
    y = ((xg - per(m)) / per(sb) * per(r) + per(d)) * w[:, None] + b[:, None]
    return y.reshape(x.shape)


def _grads(layer_or_fn, x, grad, params):
    x = x.detach().clone().requires_grad_()
    y = layer_or_fn(x)
    gs = torch.autograd.grad(y, [x] + list(params), grad)
    return y.detach(), gs


# -- BN equivalence -------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [0, 1, 2, 3])
@pytest.mark.parametrize("how", ["fixed", "schedule_warmup"])
def test_rmax1_dmax0_equals_batchnorm_training(path, spatial, how):
    dims = max(spatial, 1)
    kwargs = {"rmax": 1.0, "dmax": 0.0} if how == "fixed" else {}  # default schedule: (1, 0) at step 0
    layer = CLASSES[dims](3, **kwargs)
    bn = TORCH_BN[dims](3)
    _randomize(layer, mean_scale=3.0)  # running estimates far from the batch: r, d would matter
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    x = torch.randn(_shape(spatial, n=6)) * 2 + 0.5
    grad = torch.randn_like(x)
    y, (gx, gw, gb) = _grads(layer, x, grad, [layer.weight, layer.bias])
    y_bn, (gx_bn, gw_bn, gb_bn) = _grads(bn, x, grad, [bn.weight, bn.bias])
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
    _randomize(layer)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 4, 5, 3)
    grad = torch.randn_like(x)
    y, gs = _grads(layer, x, grad, [layer.weight, layer.bias])
    cl = torch.channels_last
    y2, gs2 = _grads(twin, x.to(memory_format=cl), grad.to(memory_format=cl), [twin.weight, twin.bias])
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
    _randomize(layer)
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
    y, gs = _grads(layer, x, grad, [layer.weight, layer.bias])
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    ref = lambda t: torch_reference(t, w, b, mu, sigma, 1.25, 0.25, layer.eps, groups)  # noqa: E731
    y_ref, gs_ref = _grads(ref, x, grad, [w, b])
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
    _randomize(layer)
    mu, sigma = layer.running_mean.clone(), layer.running_std.clone()
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    grad = torch.randn_like(x)
    groups = 4 // (group_size or 4)
    y, (gx,) = _grads(layer, x, grad, [])

    def reference(stop_grad):
        w, b = layer.weight.detach(), layer.bias.detach()
        return lambda t: torch_reference(t, w, b, mu, sigma, math.inf, math.inf, layer.eps, groups, stop_grad=stop_grad)

    stopped, through = reference(True), reference(False)
    y_ref, (gx_ref,) = _grads(stopped, x, grad, [])
    _, (gx_through,) = _grads(through, x, grad, [])
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
    _randomize(layer)
    w = layer.weight.detach().numpy().copy() if affine else np.ones(3)
    b = layer.bias.detach().numpy().copy() if affine else np.zeros(3)
    mu, sigma = layer.running_mean.numpy().copy(), layer.running_std.numpy().copy()
    groups = 4 // (group_size or 4)
    for step in range(5):
        x = rng.normal(0.7 * step, 1.0 + step, size=_shape(spatial))
        y = layer(torch.from_numpy(x))
        y_ref, mu, sigma, r, d, m, sb = reference_step(x, w, b, mu, sigma, rmax, dmax, eps, momentum, groups)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(layer.running_mean.numpy(), mu, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_std.numpy(), sigma, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.running_var.numpy(), sigma**2 - eps, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.last_rd[0].numpy(), r, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.last_rd[1].numpy(), d, rtol=1e-12, atol=1e-12)
        # Effective statistics (spec 4): mean m_o - d sigma_B / r, var (sigma_B / r)^2 (here minus eps).
        mean_eff, var_eff = layer.last_stats
        np.testing.assert_allclose(mean_eff.numpy(), m - d * sb / r, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(var_eff.numpy(), (sb / r) ** 2 - eps, rtol=1e-10, atol=1e-12)
        assert int(layer.num_batches_tracked) == step + 1


def test_effective_statistics_reproduce_the_output(path):
    layer = BatchRenorm2d(3, rmax=1.5, dmax=1.0, group_size=2)
    _randomize(layer)
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


# -- schedule ---------------------------------------------------------------------------------


def test_schedule_values():
    s = RenormSchedule()
    assert s(0) == (1.0, 0.0)
    assert s(5000) == (1.0, 0.0)
    rmax, dmax = s(25000)
    assert rmax == pytest.approx(1 + 2 * (25000 - 5000) / (40000 - 5000), abs=1e-12)
    assert 1 < rmax < 3 and dmax == 5.0
    rmax, dmax = s(15000)
    assert rmax == pytest.approx(1 + 2 * 10000 / 35000) and dmax == pytest.approx(5 * 10000 / 20000)
    assert s(40000) == (3.0, 5.0)
    assert s(10**7) == (3.0, 5.0)
    # Monotone, continuous ramps.
    values = np.array([s(t) for t in range(0, 50000, 250)])
    assert np.all(np.diff(values, axis=0) >= 0)
    assert np.abs(np.diff(values, axis=0)).max() < 0.07


def test_schedule_scaled_to_a_shorter_run():
    s = RenormSchedule().scaled(4000)  # the paper's 40k steps squeezed into 4k
    assert (s.warmup_steps, s.rmax_steps, s.dmax_steps) == (500, 4000, 2500)
    assert s(500) == (1.0, 0.0) and s(2500)[1] == 5.0 and s(4000) == (3.0, 5.0)
    assert RenormSchedule().scaled(80000, reference_steps=40000).warmup_steps == 10000
    with pytest.raises(ValueError, match="RenormSchedule"):
        RenormSchedule().scaled(0)
    with pytest.raises(ValueError, match="rmax_steps"):
        RenormSchedule(warmup_steps=100, rmax_steps=50)
    with pytest.raises(ValueError, match="rmax_max"):
        RenormSchedule(rmax_max=0.5)


def test_layer_follows_its_schedule_by_training_steps(path):
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0 + step, 0.5 * step

    layer = BatchRenorm2d(2, schedule=schedule)
    x = torch.randn(4, 2, 3, 3)
    for _ in range(3):
        layer(x)
    layer.eval()
    layer(x)  # inference does not count as a step
    layer.train()
    layer(x)
    assert seen == [0, 1, 2, 3]
    assert int(layer.num_batches_tracked) == 4
    # The step count survives a state dict round trip: a fresh layer resumes the schedule.
    fresh = BatchRenorm2d(2, schedule=schedule)
    fresh.load_state_dict(layer.state_dict())
    fresh(x)
    assert seen[-1] == 4


def test_default_schedule_is_plain_bn_at_first():
    layer = BatchRenorm2d(3)
    assert isinstance(layer.schedule, RenormSchedule) and layer.current_limits() == (1.0, 0.0)
    assert layer.rmax is None and layer.dmax is None
    with torch.no_grad():
        layer.num_batches_tracked.fill_(40000)
    assert layer.current_limits() == (3.0, 5.0)
    fixed = BatchRenorm2d(3, rmax=3.0, dmax=5.0)
    assert (fixed.rmax, fixed.dmax) == (3.0, 5.0) and "rmax=3.0" in repr(fixed)


def test_create_by_name():
    from bkn import norms

    layer = norms.create("brn", 64, rmax=3.0, dmax=5.0)
    assert isinstance(layer, BatchRenorm2d) and layer.current_limits() == (3.0, 5.0)
    layer = norms.create("brn", 8, spatial_dims=0, schedule=RenormSchedule().scaled(100), group_size=2)
    assert isinstance(layer, BatchRenorm1d) and layer.group_size == 2


# -- groups -------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial", [0, 2])
def test_groups_equal_separate_layers_per_chunk(path, spatial):
    dims = max(spatial, 1)
    g, n = 2, 6
    layer = CLASSES[dims](3, rmax=1.4, dmax=0.6, group_size=g)
    _randomize(layer, mean_scale=0.5)
    singles = [copy.deepcopy(layer) for _ in range(n // g)]
    for s in singles:
        s.group_size = None
    x = torch.randn(_shape(spatial, n=n)) * 1.5 + 0.3
    grad = torch.randn_like(x)
    y, (gx, gw, gb) = _grads(layer, x, grad, [layer.weight, layer.bias])
    parts = [
        _grads(s, x[i * g : (i + 1) * g], grad[i * g : (i + 1) * g], [s.weight, s.bias]) for i, s in enumerate(singles)
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


# -- inference, buffers, state dicts ------------------------------------------------------------


@pytest.mark.parametrize("spatial", [0, 1, 2, 3])
def test_eval_output_uses_mu_and_sigma(path, spatial):
    dims = max(spatial, 1)
    layer = CLASSES[dims](3, rmax=2.0, dmax=1.0)
    _randomize(layer)
    for _ in range(3):
        layer(torch.randn(_shape(spatial)) * 2 + 1)
    layer.eval()
    x = torch.randn(_shape(spatial))
    y = layer(x)
    shape = (1, 3) + (1,) * spatial
    mu, sigma = layer.running_mean.view(shape), layer.running_std.view(shape)
    expected = layer.weight.detach().view(shape) * (x - mu) / sigma + layer.bias.detach().view(shape)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    assert layer.last_stats is None and layer.last_rd is None


def test_buffers_initialised_and_consistent():
    layer = BatchRenorm2d(4)
    assert torch.equal(layer.running_mean, torch.zeros(4)) and torch.equal(layer.running_std, torch.ones(4))
    torch.testing.assert_close(layer.running_var, torch.full((4,), 1 - layer.eps))
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "running_std",
        "num_batches_tracked",
    }
    layer(torch.randn(4, 4, 3, 3) * 5)
    torch.testing.assert_close(layer.running_var, layer.running_std**2 - layer.eps)
    layer.reset_running_stats()
    assert torch.equal(layer.running_std, torch.ones(4)) and int(layer.num_batches_tracked) == 0
    torch.testing.assert_close(layer.running_var, torch.full((4,), 1 - layer.eps))


def test_batchnorm_state_dict_loads_and_evaluates_like_batchnorm():
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    for _ in range(3):
        bn(torch.randn(4, 3, 5, 5) * 2 + 1)
    layer = BatchRenorm2d(3)
    layer.load_state_dict(bn.state_dict())  # no running_std in it: derived from running_var
    torch.testing.assert_close(layer.running_std, torch.sqrt(bn.running_var + bn.eps))
    bn.eval(), layer.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(layer(x), bn(x), atol=1e-6, rtol=1e-6)
    # The same after writing running_var directly (as bkn.convert does) and syncing.
    other = BatchRenorm2d(3).eval()
    with torch.no_grad():
        other.weight.copy_(bn.weight), other.bias.copy_(bn.bias)
        other.running_mean.copy_(bn.running_mean), other.running_var.copy_(bn.running_var)
    other.sync_running_std()
    torch.testing.assert_close(other(x), bn(x), atol=1e-6, rtol=1e-6)


def test_momentum_none_is_a_cumulative_average(path):
    layer = BatchRenorm2d(2, rmax=2.0, dmax=1.0, momentum=None).double()
    xs = [torch.randn(3, 2, 4, 4, dtype=torch.float64) * (k + 1) + k for k in range(4)]
    means, stds = [], []
    for x in xs:
        layer(x)
        means.append(x.mean((0, 2, 3)))
        stds.append(torch.sqrt(x.var((0, 2, 3), unbiased=False) + layer.eps))
    torch.testing.assert_close(layer.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(layer.running_std, torch.stack(stds).mean(0))


def test_without_running_stats_it_is_batchnorm():
    layer = BatchRenorm2d(3, rmax=3.0, dmax=5.0, track_running_stats=False)
    bn = torch.nn.BatchNorm2d(3, track_running_stats=False)
    x = torch.randn(4, 3, 3, 3)
    for mode in (True, False):
        layer.train(mode), bn.train(mode)
        torch.testing.assert_close(layer(x), bn(x), atol=1e-6, rtol=1e-6)
    layer.train()
    layer(x)
    r, d = layer.last_rd
    assert torch.equal(r, torch.ones(1, 3)) and torch.equal(d, torch.zeros(1, 3))


def test_repeated_runs_are_bitwise_identical(path):
    def run():
        torch.manual_seed(3)
        layer = BatchRenorm2d(8, rmax=1.5, dmax=0.5, group_size=None)
        _randomize(layer)
        outs = []
        for _ in range(3):
            x = torch.randn(4, 8, 5, 5, requires_grad=True)
            y = layer(x)
            y.pow(2).sum().backward()
            outs += [y.detach(), x.grad, layer.weight.grad.clone(), layer.running_std.clone()]
        return outs

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_half_precision_input_uses_float_statistics():
    layer = BatchRenorm2d(3, rmax=1.5, dmax=0.5)
    _randomize(layer)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 3, 4, 4)
    y16 = layer(x.bfloat16())
    y32 = twin(x.bfloat16().float())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.running_std, twin.running_std, atol=1e-5, rtol=1e-5)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,bad", [(BatchRenorm1d, (4, 3, 2, 2)), (BatchRenorm2d, (4, 3, 5)), (BatchRenorm3d, (4, 3, 2, 2))]
)
def test_wrong_number_of_dims(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}: expected .*-d .* got {len(bad)}-d input"):
        cls(3)(torch.randn(bad))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"BatchRenorm2d: expected 4 channels .* got 3 channels"):
        BatchRenorm2d(4)(torch.randn(2, 3, 4, 4))


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match=r"BatchRenorm2d: group_size=3 must divide the batch size, got batch size 4"):
        BatchRenorm2d(2, group_size=3)(torch.randn(4, 2, 3, 3))


@pytest.mark.parametrize("shape,group_size", [((1, 3), None), ((4, 3), 1), ((1, 3, 1, 1), None)])
def test_one_value_per_channel_in_training(shape, group_size):
    cls = BatchRenorm1d if len(shape) == 2 else BatchRenorm2d
    layer = cls(3, group_size=group_size)
    message = rf"{cls.__name__}: expected more than 1 value per channel .* got input of shape \({shape[0]}, 3"
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(shape))
    layer.eval()
    assert torch.isfinite(layer(torch.randn(shape))).all()  # inference is fine


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rmax": 2.0}, "give both rmax and dmax"),
        ({"dmax": 2.0}, "give both rmax and dmax"),
        ({"rmax": 0.5, "dmax": 1.0}, "rmax must be >= 1, got 0.5"),
        ({"rmax": 2.0, "dmax": -1.0}, "dmax must be >= 0, got -1.0"),
        ({"rmax": 2.0, "dmax": 1.0, "schedule": RenormSchedule()}, "not both"),
        ({"schedule": 3.0}, "schedule must be a callable"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=rf"BatchRenorm2d: .*{match}"):
        BatchRenorm2d(3, **kwargs)


def test_schedule_returning_bad_bounds_is_reported():
    layer = BatchRenorm2d(3, schedule=lambda step: (0.5, 1.0))
    with pytest.raises(ValueError, match=r"BatchRenorm2d schedule at step 0: rmax must be >= 1"):
        layer(torch.randn(2, 3, 2, 2))


# -- property test --------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    spatial = draw(st.integers(0, 3))
    groups = draw(st.integers(1, 3))
    group_size = draw(st.integers(1, 3))
    n = groups * group_size
    c = draw(st.integers(1, 5))
    sizes = tuple(draw(st.lists(st.integers(1, 3), min_size=spatial, max_size=spatial)))
    if group_size * math.prod(sizes) < 2:
        sizes = sizes + (2,) if spatial < 3 else (2,) + sizes[1:]
        spatial = len(sizes)
    limits = draw(st.sampled_from(["fixed", "schedule", "default"]))
    kwargs = {}
    if limits == "fixed":
        kwargs = {"rmax": draw(st.floats(1.0, 5.0)), "dmax": draw(st.floats(0.0, 5.0))}
    elif limits == "schedule":
        kwargs = {"schedule": RenormSchedule(warmup_steps=1, rmax_steps=3, dmax_steps=2)}
    return dict(
        spatial=spatial,
        n=n,
        c=c,
        sizes=sizes,
        kwargs=kwargs,
        group_size=None if groups == 1 and draw(st.booleans()) else group_size,
        affine=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.5, None])),
        scale=draw(st.sampled_from([1e-3, 1.0, 1e3])),
        offset=draw(st.sampled_from([0.0, 5.0, -1e3])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        path=draw(st.sampled_from(PATHS)),
        seed=draw(st.integers(0, 2**16)),
        steps=draw(st.integers(1, 4)),
    )


@given(_cases())
def test_property_finite_outputs_and_gradients(case):
    with use_path(case["path"]):
        cls = CLASSES[max(case["spatial"], 1)]
        layer = cls(
            case["c"], group_size=case["group_size"], affine=case["affine"], momentum=case["momentum"], **case["kwargs"]
        ).to(case["dtype"])
        gen = torch.Generator().manual_seed(case["seed"])
        shape = (case["n"], case["c"]) + case["sizes"]
        for _ in range(case["steps"]):
            x = torch.randn(shape, generator=gen, dtype=case["dtype"]) * case["scale"] + case["offset"]
            x.requires_grad_()
            y = layer(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
            y.backward(torch.randn(shape, generator=gen, dtype=case["dtype"]))
            assert torch.isfinite(x.grad).all()
            if case["affine"]:
                assert torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()
            rmax, dmax = layer.current_limits()
            r, d = layer.last_rd
            assert torch.all(r <= rmax * (1 + 1e-6)) and torch.all(r >= (1 - 1e-6) / rmax)
            assert torch.all(d.abs() <= dmax * (1 + 1e-6))
            mean, var = layer.last_stats
            assert torch.isfinite(mean).all() and torch.isfinite(var).all() and torch.all(var >= 0)
            assert torch.all(layer.running_std > 0) and torch.isfinite(layer.running_mean).all()
        layer.eval()
        assert torch.isfinite(layer(x.detach())).all()


def test_copies_do_not_share_state_with_the_original(path):
    layer = BatchRenorm2d(3, rmax=2.0, dmax=1.0)
    _randomize(layer)
    x = torch.randn(4, 3, 3, 3)
    layer(x)
    twin = copy.deepcopy(layer)
    mean_before = layer.running_mean.clone()
    with torch.no_grad():
        twin.weight.mul_(2)
    y_twin = twin(x)
    torch.testing.assert_close(layer.running_mean, mean_before)  # the copy's step left the original alone
    y = layer(x)
    assert not torch.allclose(y, y_twin)
    torch.testing.assert_close(twin.running_mean, layer.running_mean)
    # A dtype conversion moves the data; the layer follows.
    layer.double()
    assert layer(x.double()).dtype == torch.float64
    torch.testing.assert_close(layer.running_var, layer.running_std**2 - layer.eps)


def test_copy_then_assign_load_updates_its_own_buffers(path):
    """A deep copy that then takes the original's tensors (``load_state_dict(assign=True)``)."""
    layer = BatchRenorm2d(3, rmax=2.0, dmax=1.0)
    x = torch.randn(4, 3, 3, 3) + 2
    layer(x)
    twin = copy.deepcopy(layer)
    twin.load_state_dict(layer.state_dict(), assign=True)
    before = twin.running_mean.clone()
    twin(x)
    assert not torch.equal(twin.running_mean, before)
    torch.testing.assert_close(twin.running_var, twin.running_std**2 - twin.eps)
