"""Batch Renormalization (docs/design.md §6): inference with the running estimates, buffers and state
dicts, determinism, half precision, copies, and the property test on both paths (helpers in
renorm_reference.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from renorm_reference import CLASSES, PATHS, batch_shape, randomize, use_path

from bkn.layers.renorm import BatchRenorm2d, RenormSchedule

# Every test that takes ``path`` (conftest.path) runs on the compiled kernels and on the torch Functions.

# -- inference, buffers, state dicts ------------------------------------------------------------


@pytest.mark.parametrize("spatial", [0, 1, 2, 3])
def test_eval_output_uses_mu_and_sigma(path, spatial):
    dims = max(spatial, 1)
    layer = CLASSES[dims](3, rmax=2.0, dmax=1.0)
    randomize(layer)
    for _ in range(3):
        layer(torch.randn(batch_shape(spatial)) * 2 + 1)
    layer.eval()
    x = torch.randn(batch_shape(spatial))
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
        randomize(layer)
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
    randomize(layer)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 3, 4, 4)
    y16 = layer(x.bfloat16())
    y32 = twin(x.bfloat16().float())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.running_std, twin.running_std, atol=1e-5, rtol=1e-5)


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
    randomize(layer)
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
