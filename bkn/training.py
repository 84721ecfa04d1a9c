"""Seeded training and evaluation of the CIFAR ResNet with each norm (the training probe's engine).

One *run* trains ``bkn.models.cifar_resnet`` with one normalization method at one
normalization group size from one seed, with the same recipe for every method (no
per-method tuning), and returns tidy rows per epoch::

    train_loss        mean cross-entropy over the epoch's SGD steps (training mode)
    test_acc          test accuracy with the method's own inference statistics
                      (running estimates for BN/BKN/BRN; GN/LN have none)
    step_time_s       mean wall time of one SGD step (forward, backward, optimizer step)
    test_acc_precise  test accuracy after replacing the running estimates by the exact
                      population statistics of the training set (PreciseBN-style,
                      :func:`bkn.stats.population_statistics`), on a copy of the model;
                      after the last epoch (``precise="last"``), every epoch (``"every"``)
                      or never (``"none"``)

``test_acc`` vs ``test_acc_precise`` separates the two ways a micro-batch hurts a
batch-dependent norm: the network it trains (both low) and the running estimates it
keeps for inference (only ``test_acc`` low). GN and LN normalize each sample with its
own statistics, so their precise accuracy *is* their accuracy (copied, not recomputed).

Reproducibility: :func:`train_run` seeds torch's global RNG with the run's seed before
building the model (weight init) and keeps it for the Monte-Carlo draws of BKN's
``official`` transition, which use the global RNG; the data order comes from its own
``torch.Generator`` seeded with the same seed; evaluations run under
``torch.random.fork_rng`` so they never shift the training draws. On the CPU with a
fixed thread count two runs with the same seed are bit-for-bit identical.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import norms
from .layers.renorm import RenormSchedule
from .models import cifar_resnet

# Method name -> (norm name in bkn.norms, options). Names as in the accuracy probe's results.
METHODS: dict[str, tuple[str, dict]] = {
    "bn": ("bn", {}),  # ghost-batch BN: statistics per group of group_size samples
    "bkn-official": ("bkn", {"transition": "official", "gain": "fixed", "p": 0.9}),  # the authors' scripts
    "bkn-analytic-adaptive": ("bkn", {"transition": "analytic", "gain": "adaptive"}),  # project's extension
    "brn": ("brn", {}),  # + the paper's (rmax, dmax) schedule scaled to the run length (see make_model)
    "gn": ("gn", {}),
    "ln": ("ln", {}),
}

METRICS = ("train_loss", "test_acc", "test_acc_precise", "step_time_s")
PRECISE = ("last", "every", "none")  # when to measure test_acc_precise


def uses_groups(method: str) -> bool:
    """Whether ``method``'s training statistics depend on the normalization group (BN, BKN, BRN)."""
    return norms.batch_dependent(check_method(method)[0])


def check_method(method: str) -> tuple[str, dict]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    return METHODS[method]


@dataclass(frozen=True)
class TrainConfig:
    """One run's recipe; identical for every method except ``method`` and ``group_size``.

    ``group_size`` is ignored (and should be the SGD batch) for methods without groups.
    Optimizer: SGD with momentum and weight decay on every parameter, the learning rate
    decayed from ``lr`` to 0 over the run by a cosine, per SGD step. No data augmentation.
    """

    method: str = "bn"
    group_size: int = 64
    seed: int = 0
    epochs: int = 12
    batch_size: int = 64
    depth: int = 8
    width: int = 16
    image_size: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 512
    precise: str = "last"

    def __post_init__(self):
        check_method(self.method)
        if self.precise not in PRECISE:
            raise ValueError(f"TrainConfig: precise must be one of {', '.join(PRECISE)}, "
                             f"got {self.precise!r}")
        for name in ("epochs", "batch_size", "group_size", "width", "image_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if uses_groups(self.method) and self.batch_size % self.group_size:
            raise ValueError(f"TrainConfig: group_size={self.group_size} must divide the SGD batch "
                             f"size {self.batch_size} (method {self.method!r})")
        if not (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig: need lr > 0, 0 <= momentum < 1, weight_decay >= 0; "
                             f"got lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}")


@dataclass
class Dataset:
    """Image tensors and labels of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int = field(default=10)

    def __post_init__(self):
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"Dataset: {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.images.shape[0]


def make_model(config: TrainConfig, in_channels: int, num_classes: int, total_steps: int) -> nn.Module:
    """The CIFAR ResNet of ``config`` with its method's norm (call after seeding: it draws the weights)."""
    norm, options = check_method(config.method)
    options = dict(options)
    if norms.batch_dependent(norm):
        options["group_size"] = config.group_size
    if norm == "brn":
        # Paper: BN for 5k steps, rmax -> 3 at 40k, dmax -> 5 at 25k. Scaled so the relaxation
        # ends with the run: BN for the first 1/8 of the steps, dmax fully open at 5/8.
        options["schedule"] = RenormSchedule().scaled(total_steps)
    return cifar_resnet(config.depth, norm, in_channels=in_channels, num_classes=num_classes,
                        width=config.width, **options)


def batches(data: Dataset, batch_size: int, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of ``data``; shuffled with ``generator`` when given, in order otherwise."""
    n = len(data)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield data.images[idx], data.labels[idx]


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` in evaluation mode (its own inference statistics)."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for x, y in batches(data, batch_size):
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
    from . import stats  # the population-statistics module of the accuracy probes

    precise = copy.deepcopy(model)
    population = stats.population_statistics(precise, list(batches(train, batch_size)))
    if not all(bool(torch.isfinite(m).all() and torch.isfinite(v).all()) for m, v in population.values()):
        return math.nan
    stats.use_population_statistics(precise, population)
    return accuracy(precise, test, batch_size)


def _cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / total))


def train_run(config: TrainConfig, train: Dataset, test: Dataset,
              on_step: Callable[[], None] | None = None) -> list[dict]:
    """Train one model from scratch; return tidy rows ``{method, group_size, seed, epoch, metric, value}``."""
    return train_model(config, train, test, on_step)[1]


def train_model(config: TrainConfig, train: Dataset, test: Dataset,
                on_step: Callable[[], None] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train one model from scratch; return it (in training mode) and the tidy rows of :func:`train_run`.

    ``on_step`` is called after every SGD step (a progress bar's update). The last
    incomplete batch of an epoch is dropped so that every group has ``group_size`` samples.
    Methods without groups record ``group_size`` = the SGD batch size.
    """
    if tuple(train.images.shape[-2:]) != (config.image_size,) * 2:
        raise ValueError(f"train_model: config.image_size={config.image_size} but the training images are "
                         f"{tuple(train.images.shape[-2:])}; load the data at the configured size")
    if len(train) < config.batch_size:
        raise ValueError(f"train_model: batch_size={config.batch_size} exceeds the {len(train)} "
                         f"training samples")
    steps_per_epoch = len(train) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    group_size = config.group_size if uses_groups(config.method) else config.batch_size

    torch.manual_seed(config.seed)  # weights now, BKN's Monte-Carlo draws during training
    order = torch.Generator().manual_seed(config.seed)  # data order, independent of the draws
    model = make_model(config, train.images.shape[1], train.num_classes, total_steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)

    rows: list[dict] = []

    def record(epoch: int, metric: str, value: float) -> None:
        rows.append({"method": config.method, "group_size": group_size, "seed": config.seed,
                     "epoch": epoch, "metric": metric, "value": float(value)})

    step = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses, seconds = [], 0.0
        for x, y in batches(train, config.batch_size, generator=order, drop_last=True):
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(config.lr, step, total_steps)
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - start
            losses.append(loss.detach())
            step += 1
            if on_step is not None:
                on_step()
        record(epoch, "train_loss", torch.stack(losses).mean().item())
        record(epoch, "step_time_s", seconds / len(losses))
        with torch.random.fork_rng():  # evaluation must not shift the training run's random draws
            acc = accuracy(model, test, config.eval_batch_size)
            record(epoch, "test_acc", acc)
            if config.precise == "every" or (config.precise == "last" and epoch == config.epochs):
                precise = (precise_accuracy(model, train, test, config.eval_batch_size)
                           if uses_groups(config.method) else acc)
                record(epoch, "test_acc_precise", precise)
    return model, rows
