"""The copy-bandwidth reference's tensors: :class:`TensorCase`."""

from __future__ import annotations

import torch

from .decode import decode_input
from .matrix import SEED, check_pruned
from .process import configure_threads
from .timing import synchronize


class TensorCase:
    """A source and a destination tensor of one layer benchmark's input size, ``(group_size, *shape)``.

    Same pruning as the layers (:func:`suites.harness.matrix.check_pruned`), so every copy
    has the layer benchmarks it is the reference of.
    """

    def __init__(self, group_size: int, shape: str, device: str, dtype: str, memory_format: str, prune: bool = True):
        configure_threads()
        spec = decode_input(shape, device, dtype, memory_format)
        self.device, self.dtype = spec.device, spec.dtype
        if prune:
            check_pruned(group_size, spec.dims, self.device, dtype, memory_format)
        self.src = spec.randn(group_size, torch.Generator().manual_seed(SEED))
        self.dst = torch.empty_like(self.src)
        self.nbytes = self.src.numel() * self.src.element_size()

    def copy(self) -> torch.Tensor:
        return self.dst.copy_(self.src)

    def warm_up(self) -> None:
        for _ in range(2):
            self.copy()
        synchronize(self.device)
