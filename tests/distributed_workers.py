"""Worker functions for the multi-process tests (module-level, so spawned processes can import them)."""

from __future__ import annotations

import os
import signal
import time

import torch

from bkn.layers import SyncBatchNorm


def make_layer(channels: int, momentum, dtype=torch.float64) -> SyncBatchNorm:
    layer = SyncBatchNorm(channels, momentum=momentum).to(dtype)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.weight.copy_(1 + 0.2 * torch.randn(channels, generator=gen, dtype=dtype))
        layer.bias.copy_(0.2 * torch.randn(channels, generator=gen, dtype=dtype))
    return layer


def sync_bn_steps(rank, world_size, x_full, dy_full, sizes, momentum, steps):
    """``steps`` training steps of SyncBN on this worker's shard; returns what the test compares."""
    start = sum(sizes[:rank])
    x = x_full[start : start + sizes[rank]]
    dy = dy_full[start : start + sizes[rank]]
    layer = make_layer(x.shape[1], momentum).train()
    for _ in range(steps):
        layer.zero_grad()
        xs = x.clone().requires_grad_(True)
        y = layer(xs)
        y.backward(dy)
    return {
        "y": y.detach(),
        "dx": xs.grad,
        "dweight": layer.weight.grad,
        "dbias": layer.bias.grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
        "num_batches_tracked": layer.num_batches_tracked,
        "eval": layer.eval()(x),
    }


def die_before_collective(rank, world_size, how):
    """Rank 1 dies (or raises, or hangs) while rank 0 waits for it in an all-reduce."""
    if rank == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise":
            raise ValueError("planted failure in worker 1")
        if how == "hang":
            time.sleep(600)
    layer = make_layer(4, 0.1).train()
    layer(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    return "done"


def rank_and_size(rank, world_size):
    return rank, world_size
