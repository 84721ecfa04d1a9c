"""SyncBatchNorm on the CPU (gloo): exactly BatchNorm over the concatenated batch of every worker.

Workers are real processes spawned by :func:`bkn.probes.distributed.run` (process group over
127.0.0.1, gloo, bounded by a timeout). float64, tolerance 1e-10.
"""

from __future__ import annotations

import time

import distributed_workers as workers
import pytest
import torch
from torch import nn

from bkn import methods
from bkn.layers import SyncBatchNorm
from bkn.probes import distributed

pytestmark = pytest.mark.skipif(not distributed.available(), reason="torch.distributed with gloo is not available")
TOL = dict(rtol=1e-10, atol=1e-10)


def _reference(x, dy, momentum, steps):
    """torch's BatchNorm over the whole batch, with the workers' initial parameters."""
    cls = nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d
    bn = cls(x.shape[1], momentum=momentum).double().train()
    layer = workers.make_layer(x.shape[1], momentum)
    bn.load_state_dict(layer.state_dict())
    for _ in range(steps):
        bn.zero_grad()
        xs = x.clone().requires_grad_(True)
        y = bn(xs)
        y.backward(dy)
    return y.detach(), xs.grad, bn


@pytest.mark.parametrize(
    "sizes, shape, momentum",
    [
        ((3, 3), (5, 4, 4), 0.1),  # two equal workers
        ((1, 4), (5, 3, 3), 0.1),  # unequal: one sample on worker 0
        ((2, 1, 4), (6, 2, 5), None),  # three unequal workers, cumulative running average
        ((2, 3, 1), (7,), 0.3),  # (N, C) features
    ],
)
@pytest.mark.slow
def test_pooled_statistics_equal_batchnorm_over_the_concatenated_batch(sizes, shape, momentum):
    gen = torch.Generator().manual_seed(0)
    n = sum(sizes)
    x = 1.5 * torch.randn((n, *shape), generator=gen, dtype=torch.float64) + 0.7
    dy = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    out = distributed.run(workers.sync_bn_steps, len(sizes), (x, dy, sizes, momentum, 2), timeout_s=120)
    y_ref, dx_ref, bn = _reference(x, dy, momentum, 2)
    torch.testing.assert_close(torch.cat([o["y"] for o in out]), y_ref, **TOL)
    torch.testing.assert_close(torch.cat([o["dx"] for o in out]), dx_ref, **TOL)
    # Parameter gradients are per worker (DDP averages them); their sum is the whole batch's.
    torch.testing.assert_close(sum(o["dweight"] for o in out), bn.weight.grad, **TOL)
    torch.testing.assert_close(sum(o["dbias"] for o in out), bn.bias.grad, **TOL)
    for o in out:  # every worker keeps the same running estimates, those of the whole batch
        torch.testing.assert_close(o["running_mean"], bn.running_mean, **TOL)
        torch.testing.assert_close(o["running_var"], bn.running_var, **TOL)
        assert int(o["num_batches_tracked"]) == int(bn.num_batches_tracked) == 2
    bn.eval()
    start = 0
    for size, o in zip(sizes, out):  # eval mode: each worker alone, with the pooled running estimates
        torch.testing.assert_close(o["eval"], bn(x[start : start + size]).detach(), **TOL)
        start += size


def test_one_worker_is_batchnorm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64)
    dy = torch.randn_like(x)
    (out,) = distributed.run(workers.sync_bn_steps, 1, (x, dy, (6,), 0.1, 2), timeout_s=120)
    y_ref, dx_ref, bn = _reference(x, dy, 0.1, 2)
    torch.testing.assert_close(out["y"], y_ref, **TOL)
    torch.testing.assert_close(out["dx"], dx_ref, **TOL)
    torch.testing.assert_close(out["running_var"], bn.running_var, **TOL)


def test_without_a_process_group_it_is_batchnorm_bit_for_bit():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    y_ref, dx_ref, bn = _reference(x, dy, 0.1, 2)
    out = workers.sync_bn_steps(0, 1, x, dy, (6,), 0.1, 2)
    assert torch.equal(out["y"], y_ref) and torch.equal(out["dx"], dx_ref)
    assert torch.equal(out["running_mean"], bn.running_mean) and torch.equal(out["running_var"], bn.running_var)


def test_registry_and_conversion_give_a_torch_syncbatchnorm():
    method = methods.get("syncbn")
    layer = method.build(8)
    assert isinstance(layer, nn.SyncBatchNorm) and isinstance(layer, SyncBatchNorm)
    assert method.batch_dependent and not method.uses_groups
    model = method.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    assert type(model[1]) is SyncBatchNorm
    with pytest.raises(ValueError, match="takes no group_size"):
        from bkn import norms

        norms.create("syncbn", 8, group_size=2)


@pytest.mark.parametrize(
    "how, message",
    [
        ("kill", "worker 1 of 2 was killed by signal 9"),
        ("raise", "worker 1 of 2 failed: ValueError: planted failure in worker 1"),
        ("hang", "did not finish within 20 s"),
    ],
)
@pytest.mark.slow
def test_a_dead_or_stuck_worker_stops_the_run_with_a_clear_error(how, message):
    started = time.monotonic()
    with pytest.raises(distributed.WorkerError, match=message):
        distributed.run(workers.die_before_collective, 2, (how,), timeout_s=20)
    assert time.monotonic() - started < 60  # bounded: never a hang


@pytest.mark.slow
def test_run_returns_each_ranks_value():
    assert distributed.run(workers.rank_and_size, 3, timeout_s=60) == [(0, 3), (1, 3), (2, 3)]
