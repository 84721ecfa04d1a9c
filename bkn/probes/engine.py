"""The training engine of both probes: seeded SGD on a :class:`bkn.probes.data.Dataset`, and evaluation.

* :func:`train_epochs` - the one training loop. The drift probe trains its networks for the
  ``trained`` state with it (:mod:`bkn.probes.drift.setups`), the training probe its runs
  (:mod:`bkn.probes.training.runs`). Cross-entropy, SGD with momentum and weight decay on
  every parameter, the learning rate decayed from ``recipe.lr`` to 0 by
  ``torch.optim.lr_scheduler.CosineAnnealingLR`` stepped after every SGD step, no data
  augmentation. Each epoch is one seeded permutation of the data in batches of
  ``recipe.batch_size``, its incomplete tail dropped (so every normalization group is
  full); a run of ``steps`` steps may end inside an epoch.
* :func:`accuracy` - top-1 accuracy with the model's own inference statistics.
* :func:`precise_accuracy` - the same after replacing the running estimates by the exact
  population statistics of the training set (PreciseBN-style), on a copy.

Reproducibility: the data order comes from a ``torch.Generator`` seeded with ``seed``
(its own stream: the weight initialisation and the Monte-Carlo draws of BKN's ``official``
transition use torch's global RNG, which the *caller* seeds before building the model).
On the CPU with a fixed thread count, the same model, data, recipe and seed give the same
weights bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bkn.probes.data import Dataset


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The optimizer's settings: SGD batch, peak learning rate, momentum, weight decay."""

    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"Recipe: batch_size must be a positive int, got {self.batch_size!r}")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ValueError(
                f"Recipe: need lr > 0, 0 <= momentum < 1, weight_decay >= 0; "
                f"got lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}"
            )


@dataclasses.dataclass
class Epoch:
    """One pass of :func:`train_epochs` (the last may stop early, at the run's last step)."""

    number: int  # from 1
    losses: list[torch.Tensor]  # the cross-entropy of each SGD step (detached, 0-d)
    seconds: float  # wall time of those steps: forward, backward, optimizer step

    @property
    def mean_loss(self) -> float:
        return torch.stack(self.losses).mean().item()


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    """Full batches in one pass over ``data`` (the tail is dropped)."""
    return len(data) // batch_size


def train_epochs(
    model: nn.Module,
    data: Dataset,
    recipe: Recipe,
    steps: int,
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> Iterator[Epoch]:
    """Train ``model`` in place for ``steps`` SGD steps on ``data``; yield each epoch's record as it ends.

    A generator, so the caller can evaluate between epochs (wrap evaluations that draw
    random numbers in ``torch.random.fork_rng`` to leave the training draws alone).
    ``on_step`` is called after every step (a progress bar's update).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_epochs: steps must be a positive int, got {steps!r}")
    if steps_per_epoch(data, recipe.batch_size) < 1:
        raise ValueError(
            f"train_epochs: batch_size={recipe.batch_size} exceeds the {len(data)} samples of {data.name!r}"
        )
    order = torch.Generator().manual_seed(seed)  # data order, independent of the global RNG's draws
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    step, number = 0, 0
    while step < steps:
        number += 1
        model.train()
        epoch = Epoch(number, [], 0.0)
        for x, y in data.batches(recipe.batch_size, generator=order, drop_last=True):
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch.seconds += time.perf_counter() - start
            scheduler.step()
            epoch.losses.append(loss.detach())
            step += 1
            if on_step is not None:
                on_step()
            if step == steps:
                break
        yield epoch


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in evaluation mode (its own inference statistics); its mode is restored."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in data.batches(batch_size):
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(data)


def precise_accuracy(model: nn.Module, train: Dataset, test: Dataset, batch_size: int = 512) -> float:
    """Test accuracy of a copy of ``model`` normalizing with the training set's population statistics.

    The copy's running estimates are replaced by the exact mean and variance of every
    batch-dependent layer's input over the whole training set (each earlier layer already
    using its own), as PreciseBN / fvcore's ``update_bn_stats`` do, then it is evaluated
    on ``test``; ``model`` is left untouched. NaN if the statistics are not finite (a
    diverged run).
    """
    from bkn.probes import stats

    precise = copy.deepcopy(model)
    population = stats.population_statistics(precise, list(train.batches(batch_size)))
    if not all(bool(torch.isfinite(m).all() and torch.isfinite(v).all()) for m, v in population.values()):
        return math.nan
    stats.use_population_statistics(precise, population)
    return accuracy(precise, test, batch_size)
