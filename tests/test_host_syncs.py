"""No host synchronisation in a training step on the accelerator path (the Python Functions CUDA takes).

Counted with :mod:`bkn.probes.dispatch_count` on CPU tensors with the compiled kernels switched
off. Also: the counter itself (a planted sync, a known op sequence), :func:`device_check`, the
prior-variance check, the guard and ``momentum=None`` on the device giving the old numbers
exactly, BRN's schedule on the device, and centred gradient sums.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import bkn.methods
from bkn.layers import BatchKalmanNorm2d, BatchRenorm2d
from bkn.layers._checks import device_check
from bkn.layers._function import _gradient_sums
from bkn.layers.renorm import RenormSchedule
from bkn.probes.dispatch_count import (
    NO_KERNEL_OPS,
    DispatchCounter,
    accelerator_path,
    count,
    measure_method,
    single_process_group,
    small_net,
)


def _train_step_syncs(name: str) -> list[str]:
    torch.manual_seed(0)
    x, target = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    model = bkn.methods.get(name).convert(small_net(), group_size=2).train()

    def step():
        nn.functional.cross_entropy(model(x), target).backward()

    with accelerator_path():
        step()  # warm-up
        return count(step, stacks=True).syncs


@pytest.mark.parametrize("name", bkn.methods.names())
def test_no_host_sync_in_a_training_step(name):
    with single_process_group() if name == "syncbn" else contextlib.nullcontext():
        syncs = _train_step_syncs(name)
    assert not syncs, f"{name}: {len(syncs)} host sync(s) in a training step:\n" + "\n\n".join(syncs)


def test_counter_sees_a_planted_sync():
    class Planted(nn.Module):
        def forward(self, x):
            if x.sum().item() > 1e9:  # a host read in the forward
                return x * 2
            return x

    counter = count(lambda: Planted()(torch.ones(3)), stacks=True)
    assert len(counter.syncs) == 1
    assert "test_host_syncs.py" in counter.syncs[0] and "forward" in counter.syncs[0]
    for read in (float, int, bool):
        assert len(count(lambda: read(torch.ones(())), stacks=False).syncs) == 1


def test_counter_counts_a_known_op_sequence():
    a, b = torch.ones(3), torch.full((3,), 2.0)
    counter = DispatchCounter()
    with counter:
        torch.add(a, b).mul(b).sum()
        a.neg()
    assert dict(counter.ops) == {"add": 1, "mul": 1, "sum": 1, "neg": 1}
    assert counter.total == 4 and counter.syncs == []


def test_kernel_ops_leave_out_views_and_allocations():
    """A known sequence: 4 views/metadata ops and 2 allocations launch nothing; the 3 arithmetic ops do."""
    a = torch.ones(2, 3)
    counter = DispatchCounter()
    with counter:
        v = a.view(3, 2).t().unsqueeze(0).detach()  # view, t, unsqueeze, detach
        e, f = torch.empty(3), torch.empty_like(a)  # allocations
        w = (v + 1).mul(2).sum()  # add, mul, sum
    assert counter.total == 9
    assert counter.kernel_total == 3, dict(counter.ops)
    assert {"view", "t", "unsqueeze", "detach", "empty", "empty_like"} <= NO_KERNEL_OPS
    assert not {"add", "mul", "sum", "clone", "copy_", "_local_scalar_dense"} & NO_KERNEL_OPS
    del e, f, w


def test_counter_counts_backward_ops():
    w = torch.ones(3, requires_grad=True)
    counter = count(lambda: (w * 2).sum().backward())
    assert counter.ops["mul"] >= 2  # forward and backward's mul


def test_device_check_raises_on_cpu_and_is_not_a_counted_sync():
    counter = count(lambda: device_check(torch.ones(3) > 0, "never raised"))
    assert counter.syncs == [] and counter.total >= 1  # the read happened, inside device_check
    with pytest.raises(ValueError, match="expected x to be positive"):
        device_check(torch.tensor([1.0, -1.0]) > 0, "expected x to be positive")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_bad_prior_variance_raises(bad, native):
    layer = BatchKalmanNorm2d(3, p=0.5)
    x = torch.randn(4, 3, 2, 2)
    var = torch.ones(3)
    var[1] = bad
    with pytest.raises(ValueError, match="prior variance"):
        if native:
            layer(x, prior=(torch.zeros(3), var))
        else:
            with accelerator_path():
                layer(x, prior=(torch.zeros(3), var))


def test_guarded_prior_is_exactly_the_observation():
    """Ratio above the guard: output, posterior and input gradient equal p = 0's bit for bit; prior grads 0."""
    torch.manual_seed(3)
    x = torch.randn(8, 3, 4, 4)
    dy = torch.randn_like(x)
    outs = []
    for p, guard in ((0.5, 100.0), (0.0, 100.0)):
        layer = BatchKalmanNorm2d(3, p=p, guard=guard, group_size=2)
        xi = x.clone().requires_grad_()
        m_p = torch.randn(3, requires_grad=True)
        v_p = torch.full((3,), 1e4, requires_grad=True)  # ratio ~1e4 >= 100: guarded
        with accelerator_path():
            y = layer(xi, prior=(m_p, v_p))
            (y * dy).sum().backward()
        outs.append((y.detach(), layer.posterior[0].detach(), layer.posterior[1].detach(), xi.grad, m_p.grad, v_p.grad))
    for a, b in zip(outs[0][:4], outs[1][:4]):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][4], torch.zeros(3)) and torch.equal(outs[0][5], torch.zeros(3))


@pytest.mark.parametrize("make", ["bkn", "brn", "brn-groups", "bn-groups"])
def test_momentum_none_on_the_device_equals_the_host_factor(make):
    """``momentum=None`` (factor ``1 / steps`` as a tensor) equals momentum set to the float ``1 / k`` at step k."""
    factories = {
        "bkn": lambda m: BatchKalmanNorm2d(3, p=0.5, momentum=m, group_size=2),
        "brn": lambda m: BatchRenorm2d(3, rmax=3.0, dmax=5.0, momentum=m),
        "brn-groups": lambda m: BatchRenorm2d(3, rmax=3.0, dmax=5.0, momentum=m, group_size=2),
        "bn-groups": lambda m: BatchKalmanNorm2d(3, p=0.0, momentum=m, group_size=2),
    }
    cumulative, stepped = factories[make](None), factories[make](0.0)
    torch.manual_seed(5)
    with accelerator_path():
        for k in range(1, 4):
            x = torch.randn(8, 3, 2, 2) + k
            prior = (torch.full((3,), 0.5), torch.full((3,), 2.0))
            stepped.momentum = 1.0 / k
            kwargs = {"prior": prior} if make == "bkn" else {}
            cumulative(x, **kwargs), stepped(x, **kwargs)
    for key, value in cumulative.state_dict().items():
        assert torch.equal(value, stepped.state_dict()[key]), key


@settings(max_examples=40, deadline=None)
@given(
    warmup=st.integers(0, 50),
    extra=st.tuples(st.integers(0, 50), st.integers(0, 50)),
    maxima=st.tuples(st.floats(1.0, 10.0), st.floats(0.0, 10.0)),
    step=st.integers(0, 200),
)
def test_schedule_on_the_device_equals_the_float_schedule(warmup, extra, maxima, step):
    schedule = RenormSchedule(warmup, maxima[0], warmup + extra[0], maxima[1], warmup + extra[1])
    rmax, dmax = schedule.on_device(torch.tensor(step))
    assert (rmax.item(), dmax.item()) == schedule(step)


def test_gradient_sums_are_centred():
    """float32 inputs with mean 1e4 and spread 1: S2 matches a float64 reference (the uncentred form lost ~1e-2)."""
    torch.manual_seed(11)
    groups, shape = 2, (8, 4, 16, 16)
    x = (torch.randn(shape, dtype=torch.float64) + 1e4).float()
    dy = torch.randn(shape).float()
    xg, dyg = x.double().unflatten(0, (groups, -1)), dy.double().unflatten(0, (groups, -1))
    mean64 = xg.mean((1, 3, 4))
    var64 = (xg - mean64[:, None, :, None, None]).square().mean((1, 3, 4))
    mean, var = mean64.float(), var64.float()
    sum_dy, s2 = _gradient_sums(dy, x, mean, var, groups, 1e-5)
    ref = (dyg * (xg - mean.double()[:, None, :, None, None])).sum((1, 3, 4)) * torch.rsqrt(var.double() + 1e-5)
    torch.testing.assert_close(sum_dy.double(), dyg.sum((1, 3, 4)), rtol=1e-5, atol=1e-3)
    error = ((s2.double() - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
    assert error < 1e-4, f"relative error of sum(dy (x - m)) / sqrt(v + eps): {error:.2e}"


def test_measure_method_reports_ops_per_norm():
    result = measure_method("bn")
    assert result["syncs"] == 0 and result["ops"] > 0 and result["ops_per_norm"] > 0
