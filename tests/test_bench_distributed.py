"""The DDP training-step benchmark (suites/bench_distributed.py): two real gloo workers in lockstep.

Each test that starts a peer process is bounded: the harness's process-group timeout
(``TIMEOUT_S``) ends any collective whose peer is gone, and the dead-peer test checks
that rank 0 fails well within it, with a message naming the peer.
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from bkn import methods
from bkn.probes import distributed
from bkn.probes.distributed import DistributedDataParallel
from suites.bench_distributed import TimeDDPTrainStep
from suites.harness import ddp, process, timing

needs_gloo = pytest.mark.skipif(not distributed.available(), reason="torch.distributed with gloo is unavailable")


@pytest.fixture(autouse=True)
def _fresh_process():
    """No peer, process group or cached case outlives a test."""
    yield
    ddp.close_open()
    timing._last_case = None
    assert not (dist.is_available() and dist.is_initialized())


def set_up(method: str, world_size: int) -> TimeDDPTrainStep:
    bench = TimeDDPTrainStep()
    bench.setup(method, 2, world_size)
    return bench


@needs_gloo
def test_rank0_gradients_are_the_two_workers_average():
    # The peer steps in lockstep with the same parameters on its own batch, so after one
    # timed step rank 0's gradients are the mean of both batches' gradients.
    bench = set_up("bn", 2)
    assert isinstance(bench.case.case.model, DistributedDataParallel) and dist.get_world_size() == 2
    module = bench.case.case.model.module
    reference = copy.deepcopy(module)
    expected = []
    for rank in (0, 1):
        batch = ddp.build_case("bn", 2, rank)
        reference.zero_grad()
        F.cross_entropy(reference(batch.x), batch.y).backward()
        expected.append([p.grad.clone() for p in reference.parameters()])
    assert not torch.equal(expected[0][0], expected[1][0])  # the workers' batches differ
    bench.time_train_step("bn", 2, 2)
    for got, g0, g1 in zip(module.parameters(), *expected):
        torch.testing.assert_close(got.grad, (g0 + g1) / 2, rtol=1e-4, atol=1e-6)


@needs_gloo
@pytest.mark.slow
def test_syncbn_pools_its_statistics_only_across_workers(monkeypatch):
    import torch.distributed.nn.functional as collectives

    calls = []
    real = collectives.all_reduce

    def counted(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(collectives, "all_reduce", counted)
    for world_size in (1, 2):
        bench = set_up("syncbn", world_size)
        calls.clear()
        bench.time_train_step("syncbn", 2, world_size)
        layers = [m for m in bench.case.case.model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert len(layers) == 19  # the pre-activation ResNet-20's norms, all of them SyncBN
        # one all-reduce of (count, sum, sum of squares) per layer at 2 workers; none at 1
        assert calls == ([] if world_size == 1 else [1 + 2 * m.num_features for m in layers])


@needs_gloo
@pytest.mark.slow
def test_a_dead_peer_is_a_clear_error_within_the_timeout():
    bench = set_up("bn", 2)
    peer = bench.case.peers[0]
    os.kill(peer.pid, signal.SIGKILL)
    peer.join(10)
    with pytest.raises(RuntimeError, match="DDP peer rank 1 of 2 was killed by signal 9"):
        bench.setup("bn", 2, 2)  # asv's setup before every sample
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="DDP peer rank 1 of 2 was killed by signal 9; rank 0: "):
        bench.time_train_step("bn", 2, 2)
    assert time.monotonic() - start < ddp.TIMEOUT_S / 2


@needs_gloo
@pytest.mark.slow
def test_a_peer_that_fails_to_start_is_a_clear_error_not_a_wait(monkeypatch):
    real = ddp.build_case

    def build_then_break_the_peers_environment(*args):
        case = real(*args)  # rank 0's case; the peer, spawned next, inherits the environment
        monkeypatch.setenv(process.THREADS_ENV, "none")  # the peer's import of the harness raises
        return case

    monkeypatch.setattr(ddp, "build_case", build_then_break_the_peers_environment)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DDP peer rank 1 of 2 exited \(1\); rank 1 sent no error"):
        ddp.DDPCase("bn", 2, 2)
    assert time.monotonic() - start < ddp.READY_TIMEOUT_S / 2
    assert ddp._open is None and not dist.is_initialized()


@needs_gloo
@pytest.mark.slow
def test_close_stops_the_peer_and_leaves_the_group():
    bench = set_up("bkn-analytic", 2)
    peer = bench.case.peers[0]
    assert peer.is_alive() and dist.is_initialized()
    ddp.close_open()
    assert not peer.is_alive() and not dist.is_initialized()


def test_without_gloo_world_size_two_is_skipped_and_one_runs(monkeypatch):
    monkeypatch.setattr(ddp.distributed, "available", lambda: False)
    with pytest.raises(NotImplementedError, match="gloo backend is not available"):
        set_up("syncbn", 2)
    bench = set_up("syncbn", 1)  # one process needs no torch.distributed
    bench.time_train_step("syncbn", 1, 1)
    assert bench.case.peers == [] and not dist.is_initialized()


@needs_gloo
def test_gloo_ddp_accepts_only_bkns_cpu_syncbn():
    # torch's DDP refuses every torch.nn.SyncBatchNorm in a CPU module; bkn's has a gloo path.
    distributed.init_process_group(0, 1, distributed.free_port(), "gloo", 30)
    try:
        ours = methods.get("syncbn").build(4)
        with pytest.raises(ValueError, match="only work with GPU modules"):
            torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(ours))
        with pytest.raises(ValueError, match="only work with GPU modules"):
            DistributedDataParallel(torch.nn.Sequential(torch.nn.SyncBatchNorm(4)))
        wrapped = ddp.wrap(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), ours))
        assert wrapped(torch.randn(2, 3, 5, 5)).shape == (2, 4, 5, 5)
    finally:
        dist.destroy_process_group()


def test_world_size_must_be_positive():
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        ddp.DDPCase("bn", 2, 0)
