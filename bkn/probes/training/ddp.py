"""What one training run needs to train on K workers: its rank, its shard of each batch, DDP, epoch totals.

A multi-worker run (``TrainConfig.world_size = K > 1``) trains inside an initialized
``torch.distributed`` process group of K processes (started by :mod:`.workers`, or by
``torchrun``). Every worker

* builds the model from the run's seed, so the weights start identical on every rank
  (``DistributedDataParallel`` also broadcasts rank 0's at construction);
* draws the same sequence of global batches as the single-process run with that seed
  and keeps its own slice of each (:class:`Shard`): worker ``r`` of ``K`` takes rows
  ``[r * B/K, (r + 1) * B/K)`` of every global batch of ``B``;
* trains the model wrapped in ``DistributedDataParallel`` (:func:`wrap`), which averages
  the gradients over the workers: with equal micro-batches that is the gradient of the
  mean loss over the global batch. Its buffers (running estimates) are broadcast from
  rank 0 at every forward (DDP's default), so every worker starts each step from rank 0's
  running estimates, as the groups of a single-process run share one set;
* draws BKN's Monte-Carlo samples from its own stream (:func:`seed_draws`): rank 0 keeps
  the run's seed, the others a seed derived from it and their rank.

Evaluation and result rows are rank 0's alone (the model it evaluates holds the weights
every rank holds, and rank 0's running estimates); :func:`epoch_totals` gives each epoch's
loss over every worker's samples and the slowest worker's time.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from bkn.probes.data import Dataset
from bkn.probes.distributed import DistributedDataParallel


def rank_of(world_size: int) -> int:
    """This process's rank in a process group of ``world_size`` workers (0 for one worker); ValueError if
    the group that is initialized (or its absence) does not match."""
    if world_size == 1:
        return 0
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"a training run with world_size={world_size} needs an initialized torch.distributed process group "
            f"of {world_size} workers (python -m bkn.probes.training --world-size {world_size}, or torchrun); "
            "none is initialized"
        )
    if dist.get_world_size() != world_size:
        raise ValueError(
            f"a training run with world_size={world_size} is running in a process group of "
            f"{dist.get_world_size()} workers"
        )
    return dist.get_rank()


class Shard:
    """Worker ``rank``'s rows of every global batch of ``data`` (what :func:`bkn.probes.engine.train_epochs`
    iterates): the same permutation as the single-process run, each batch of ``B`` cut into ``world_size``
    consecutive slices of ``B / world_size``."""

    def __init__(self, data: Dataset, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"Shard: rank must be in [0, {world_size}), got {rank}")
        self.data, self.rank, self.world_size = data, rank, world_size
        self.name = data.name

    def __len__(self) -> int:
        return len(self.data)  # steps per epoch count global batches

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size % self.world_size:
            raise ValueError(f"Shard: the batch size {batch_size} does not split over {self.world_size} workers")
        share = batch_size // self.world_size
        start = self.rank * share
        for x, y in self.data.batches(batch_size, generator=generator, drop_last=drop_last):
            yield x[start : start + share], y[start : start + share]


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` over the default process group (its device's)."""
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def seed_draws(seed: int, rank: int) -> None:
    """Seed torch's global RNG for the run's random draws during training: the run's seed on rank 0 (the
    single-process stream), a stream of its own on every other rank."""
    if rank:
        torch.manual_seed(seed * 65536 + rank)


def epoch_totals(losses: list[torch.Tensor], seconds: float, world_size: int) -> tuple[float, float]:
    """An epoch's mean training loss over every worker's samples and the slowest worker's seconds per step.

    One worker: exactly :attr:`bkn.probes.engine.Epoch.mean_loss` and ``seconds / steps``.
    """
    steps = len(losses)
    if world_size == 1:
        return torch.stack(losses).mean().item(), seconds / steps
    loss_sum = torch.stack(losses).sum().reshape(1).to(torch.float64)
    slowest = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(loss_sum)  # equal micro-batches: the mean of the workers' means is the global mean
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return loss_sum.item() / (steps * world_size), slowest.item() / steps
