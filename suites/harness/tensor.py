"""The copy-bandwidth reference's tensors: :class:`TensorCase`."""

from __future__ import annotations

import torch

from .decode import parse_shape, torch_device, torch_dtype, torch_memory_format
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
        dims = parse_shape(shape)
        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        fmt = torch_memory_format(memory_format, 1 + len(dims))
        if prune:
            check_pruned(group_size, dims, self.device, dtype, memory_format)
        gen = torch.Generator().manual_seed(SEED)
        x = torch.randn((group_size, *dims), generator=gen)
        self.src = x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=fmt)
        self.dst = torch.empty_like(self.src)
        self.nbytes = self.src.numel() * self.src.element_size()

    def copy(self) -> torch.Tensor:
        return self.dst.copy_(self.src)

    def warm_up(self) -> None:
        for _ in range(2):
            self.copy()
        synchronize(self.device)
