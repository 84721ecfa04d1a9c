"""One SGD training step of a whole network with every normalization layer of one method: :class:`NetworkCase`."""

from __future__ import annotations

import torch
from torch import nn

from bkn import cross_iteration_conversion, methods
from bkn.models import cifar_resnet
from bkn.probes.measure import TrainStep

from .decode import decode_input
from .matrix import SEED, check_network_pruned, skip
from .process import configure_threads
from .timing import warm_up_runs


def cifar_resnet20(method: methods.Method, group_size: int | None = None) -> nn.Module:
    """The paper's CIFAR ResNet-20 with ``method``'s layers, in groups of ``group_size`` (None: one group); a
    rival (``method.converts``) is built with BN and converted by ``bkn.convert``; MABN and CBN are prepared."""
    model = method.network(lambda norm, **options: cifar_resnet(20, norm, **options), group_size)
    return cross_iteration_conversion.prepare(model, method.norm)  # mabn, cbn: docs/design.md §16


class NetworkCase:
    """One SGD training step of a whole network with every normalization layer of ``method``.

    ``build(method, group)`` returns the model for a :class:`bkn.methods.Method` (BKN's
    priors are wired by the model or by the converter) with normalization groups of
    ``group`` samples. Without ``batch_size`` the step's batch is ``group_size`` samples,
    one group, and the norms are built without a group (``bn`` is torch's own
    ``BatchNorm2d``); with it, the batch is ``batch_size`` samples in groups of
    ``group_size`` (ghost batches; what BKN is for). The step is forward, cross-entropy,
    backward and an SGD update with momentum, on a fixed seeded batch.
    """

    def __init__(
        self,
        build,
        method: str,
        group_size: int,
        shape: str,
        device: str,
        dtype: str,
        memory_format: str,
        num_classes: int,
        prune: bool = True,
        batch_size: int | None = None,
    ):
        configure_threads()
        method = methods.get(method)
        spec = decode_input(shape, device, dtype, memory_format)
        dims, fmt, self.device, self.dtype = spec.dims, spec.memory_format, spec.device, spec.dtype
        if batch_size is not None and (batch_size < group_size or batch_size % group_size):
            raise ValueError(f"group_size {group_size} must divide batch_size {batch_size}")
        batch = group_size if batch_size is None else batch_size
        if prune:
            check_network_pruned(group_size, dims, self.device, dtype, memory_format, batch=batch)
        torch.manual_seed(SEED)
        model = build(method, None if batch_size is None else group_size)
        model = model.to(device=self.device, dtype=self.dtype, memory_format=fmt).train()
        gen = torch.Generator().manual_seed(SEED)
        x = spec.randn(batch, gen)
        y = torch.randint(0, num_classes, (batch,), generator=gen).to(self.device)
        self.train_step = TrainStep(model, x, y)  # lr 1e-3, momentum 0.9
        self.optimizer = self.train_step.optimizer

    # The step reads the model and batch from its TrainStep, so a caller that replaces them (a DDP
    # wrapper, another rank's batch: suites.harness.ddp) changes what the step runs on.
    model = property(lambda self: self.train_step.model, lambda self, v: setattr(self.train_step, "model", v))
    x = property(lambda self: self.train_step.x, lambda self, v: setattr(self.train_step, "x", v))
    y = property(lambda self: self.train_step.y, lambda self, v: setattr(self.train_step, "y", v))

    def step(self) -> torch.Tensor:
        return self.train_step()

    def warm_up(self, what: str) -> None:
        try:
            warm_up_runs(self.step, self.device, what)
        except ValueError as err:  # BN/BRN with one value per channel somewhere in the network
            if "value per channel" in str(err) or "more than 1 value" in str(err):
                skip(f"{what}: {err}")
            raise
