"""One run of the training probe: one network with one method at one group size from one seed.

Every run uses the same recipe (no per-method tuning) and the engine of
:func:`bkn.probes.engine.train_epochs`, and returns tidy rows per epoch, each with the
``evaluation`` that produced it (:data:`bkn.probes.results.EVALUATIONS`)::

    train_loss    training   mean cross-entropy over the epoch's SGD steps (training mode)
    step_time_s   training   mean wall time of one SGD step (forward, backward, optimizer step)
    test_acc      running    test accuracy with the method's own inference statistics: its
                             running estimates (BN, BKN, BRN, SyncBN); GN and LN have none and
                             normalize each test sample with its own statistics
    test_acc      population test accuracy after replacing the running estimates by the
                             exact population statistics of the training set, recomputed layer
                             by layer (PreciseBN, :func:`bkn.probes.engine.precise_accuracy`), on a
                             copy of the model; after the last epoch (``precise="last"``), every
                             epoch (``"every"``) or never (``"none"``)

``running`` vs ``population`` separates the two ways a micro-batch hurts a
batch-dependent norm: the network it trains (both low) and the running estimates it
keeps for inference (only ``running`` low). For BKN and BRN the population statistics
go into the same running buffers their eval mode reads (BRN's moving std synced), so
the network normalizes with them. GN and LN normalize each sample with its own
statistics, so their population accuracy *is* their accuracy (copied, not recomputed).

Reproducibility: :func:`train_model` seeds torch's global RNG with the run's seed before
building the model (weight init) and keeps it for the Monte-Carlo draws of BKN's
``official`` transition; the engine draws the data order from its own generator seeded
with the same seed; evaluations run under ``torch.random.fork_rng`` so they never shift
the training draws. On the CPU with a fixed thread count two runs with the same seed are
bit-for-bit identical, in this process or in a worker process (``--jobs``).

Several workers (``world_size`` K > 1, inside a process group of K processes): the SGD
batch is the global batch, each worker trains on its ``batch_size / K`` samples of it
with ``DistributedDataParallel`` and normalizes them in groups of ``group_size`` (``syncbn``:
pooled over every worker); rank 0 evaluates and returns the rows (see :mod:`.ddp`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bkn import cross_iteration_conversion, replacements
from bkn import methods as registry
from bkn.probes import engine as training
from bkn.probes.data import Dataset
from bkn.probes.training import ddp, networks

PRECISE = ("last", "every", "none")  # when to measure test_acc with population statistics


@dataclass(frozen=True)
class TrainConfig:
    """One run's recipe; identical for every method except ``method`` and ``group_size``.

    ``data`` and ``network``: :mod:`.networks` names (the network must train on the data);
    ``width`` ``None`` is the network's default, ``depth`` is the resnets' (6n+2), ``image_size``
    the digits' side. ``method``: a :mod:`bkn.methods` name. ``group_size`` is ignored (and
    should be the SGD batch) for methods without groups. Optimizer: :class:`bkn.probes.engine.Recipe` (SGD with
    momentum and weight decay, cosine decay of the learning rate to 0 over the run).
    ``world_size``: workers sharing each SGD batch of ``batch_size`` (each sees
    ``batch_size / world_size``, which ``group_size`` must divide).
    """

    method: str = "bn"
    group_size: int = 32
    seed: int = 0
    epochs: int = 15
    batch_size: int = 32
    data: str = networks.DEFAULT_DATA
    network: str = "convnet"
    depth: int = 8
    width: int | None = None
    image_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 512
    precise: str = "last"
    world_size: int = 1

    def __post_init__(self):
        registry.get(self.method)
        networks.check(self.data, (self.network,))
        if self.width is None:
            object.__setattr__(self, "width", networks.default_width(self.network))
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"TrainConfig: depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {self.depth!r}")
        if self.precise not in PRECISE:
            raise ValueError(f"TrainConfig: precise must be one of {', '.join(PRECISE)}, got {self.precise!r}")
        for name in ("epochs", "batch_size", "group_size", "width", "image_size", "eval_batch_size", "world_size"):
            value = getattr(self, name)
            if name == "width" and value is None:  # your model: its own width
                continue
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig: {name} must be a positive int, got {value!r}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"TrainConfig: the SGD batch size {self.batch_size} must split evenly over world_size="
                f"{self.world_size} workers"
            )
        if self.uses_groups and self.worker_batch_size % self.group_size:
            per_worker = f" per worker ({self.world_size} workers)" if self.world_size > 1 else ""
            raise ValueError(
                f"TrainConfig: group_size={self.group_size} must divide the SGD batch size {self.worker_batch_size}"
                f"{per_worker} (method {self.method!r})"
            )
        _ = self.recipe  # ValueError for a bad lr, momentum or weight decay

    @property
    def uses_groups(self) -> bool:
        return registry.get(self.method).uses_groups

    @property
    def batch_dependent(self) -> bool:
        """Whether the method keeps running estimates of batch statistics (its precise accuracy is measured)."""
        return registry.get(self.method).batch_dependent

    @property
    def worker_batch_size(self) -> int:
        """Samples each worker's forward sees per SGD step."""
        return self.batch_size // self.world_size

    @property
    def recipe(self) -> training.Recipe:
        return training.Recipe(self.batch_size, self.lr, self.momentum, self.weight_decay)

    @property
    def recorded_group_size(self) -> int:
        """The ``group_size`` a row records: the SGD batch for methods without groups."""
        return self.group_size if self.uses_groups else self.batch_size


def make_model(
    config: TrainConfig, in_channels: int, num_classes: int, total_steps: int, length: int = 40
) -> nn.Module:
    """The network of ``config`` with its method's norm (call after seeding: it draws the weights).

    ``length``: the input sequences' length (the convnet's head depends on it).
    ``total_steps`` scales a scheduled method's schedule to the run (``brn-scheduled``: BN
    for the first 1/8 of the steps, limits fully relaxed at the end).
    """
    method = registry.get(config.method)

    def build(norm, **options):
        return networks.build(
            config.network, norm, in_channels, length, num_classes, config.width, config.depth, **options
        )

    model = method.network(build, config.group_size, total_steps=total_steps)  # the rivals: built with BN, converted
    if replacements.report_of(model) is not None:  # converted by bkn.convert (your model, the rivals): already done
        return model
    return cross_iteration_conversion.prepare(model, method.norm)  # mabn, cbn: docs/design.md §16


def train_run(
    config: TrainConfig, train: Dataset, test: Dataset, on_step: Callable[[], None] | None = None
) -> list[dict]:
    """Train one model from scratch; return tidy rows ``{data, network, method, group_size, batch_size,
    world_size, seed, epoch, evaluation, metric, value}``."""
    return train_model(config, train, test, on_step)[1]


def train_model(
    config: TrainConfig, train: Dataset, test: Dataset, on_step: Callable[[], None] | None = None
) -> tuple[nn.Module, list[dict]]:
    """Train one model from scratch; return it (in training mode) and the tidy rows of :func:`train_run`.

    ``on_step`` is called after every SGD step (a progress bar's update). The last
    incomplete batch of an epoch is dropped so that every group has ``group_size`` samples.
    With ``config.world_size > 1`` (inside a process group of that size) every worker
    calls this; the rows are rank 0's, the other ranks return none.
    """
    _check_data(config, train)
    if len(train) < config.batch_size:
        raise ValueError(f"train_model: batch_size={config.batch_size} exceeds the {len(train)} training samples")
    rank = ddp.rank_of(config.world_size)
    total_steps = training.steps_per_epoch(train, config.batch_size) * config.epochs
    torch.manual_seed(config.seed)  # weights now, BKN's Monte-Carlo draws during training
    model = make_model(config, train.images.shape[1], train.num_classes, total_steps, train.images.shape[-1])
    net, data = model, train
    if config.world_size > 1:
        net, data = ddp.wrap(model), ddp.Shard(train, rank, config.world_size)
        ddp.seed_draws(config.seed, rank)
    rows: list[dict] = []

    def record(epoch: int, evaluation: str, metric: str, value: float) -> None:
        rows.append(
            {
                "data": config.data,
                "network": config.network,
                "method": config.method,
                "group_size": config.recorded_group_size,
                "batch_size": config.batch_size,
                "world_size": config.world_size,
                "seed": config.seed,
                "epoch": epoch,
                "evaluation": evaluation,
                "metric": metric,
                "value": float(value),
            }
        )

    for epoch in training.train_epochs(net, data, config.recipe, total_steps, config.seed, on_step):
        loss, step_time = ddp.epoch_totals(epoch.losses, epoch.seconds, config.world_size)
        if rank:
            continue  # evaluation and rows: rank 0's (the others go on to the next epoch's steps)
        record(epoch.number, "training", "train_loss", loss)
        record(epoch.number, "training", "step_time_s", step_time)
        with torch.random.fork_rng():  # evaluation must not shift the training run's random draws
            acc = training.accuracy(model, test, config.eval_batch_size)
            record(epoch.number, "running", "test_acc", acc)
            if config.precise == "every" or (config.precise == "last" and epoch.number == config.epochs):
                precise = (
                    training.precise_accuracy(model, train, test, config.eval_batch_size)
                    if config.batch_dependent
                    else acc
                )
                record(epoch.number, "population", "test_acc", precise)
    return model, rows


def _check_data(config: TrainConfig, train: Dataset) -> None:
    """The data in hand is the data ``config`` names, at its size; ValueError naming the mismatch."""
    if train.name not in (config.data, "data"):
        raise ValueError(f"train_model: config.data={config.data!r} but the training set is {train.name!r}")
    dims = 3 if config.data == "mnist1d" else 4
    if train.images.dim() != dims:
        raise ValueError(
            f"train_model: {config.network} on {config.data} takes {dims}-d inputs, got training inputs of shape "
            f"{tuple(train.images.shape)}"
        )
    if config.data == "digits" and tuple(train.images.shape[-2:]) != (config.image_size,) * 2:
        raise ValueError(
            f"train_model: config.image_size={config.image_size} but the training images are "
            f"{tuple(train.images.shape[-2:])}; load the data at the configured size"
        )
