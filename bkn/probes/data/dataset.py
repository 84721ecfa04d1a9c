"""One labelled image set in memory: what both probes train on, sample micro-batches from and evaluate on.

A :class:`Dataset` holds the whole split as two tensors (the data sets here are small and
ship with scikit-learn or are generated), so batches are index operations: no ``DataLoader``, no worker
processes, and an order that depends on nothing but a seeded ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch


@dataclasses.dataclass(frozen=True, eq=False)  # tensors: compare with torch.equal, not ==
class Dataset:
    """Images ``(N, C, H, W)`` or sequences ``(N, C, L)``, labels ``(N,)`` of one split, the number of classes."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int = 10
    name: str = "data"

    def __post_init__(self):
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"Dataset {self.name!r}: {self.images.shape[0]} images but {self.labels.shape[0]} labels")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"Dataset {self.name!r}: num_classes must be a positive int, got {self.num_classes!r}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the data in ``(images, labels)`` batches of ``batch_size``.

        Shuffled by one ``torch.randperm`` from ``generator`` when given (drawn when the
        iteration starts), in order otherwise. ``drop_last`` drops the incomplete tail
        batch, so that every batch (and every normalization group in it) is full.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Dataset {self.name!r}: batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if generator is None:  # slices: no copies, and the same values as indexing with arange
            for start in range(0, stop, batch_size):
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            return
        order = torch.randperm(n, generator=generator)
        for start in range(0, stop, batch_size):
            index = order[start : start + batch_size]
            yield self.images[index], self.labels[index]

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """The images of ``count`` distinct random samples (the first ``count`` of one permutation)."""
        if count > len(self):
            raise ValueError(f"a batch of {count} is larger than the data set {self.name!r} ({len(self)} samples)")
        return self.images[torch.randperm(len(self), generator=generator)[:count]]

    def head(self, count: int) -> Dataset:
        """The first ``count`` samples (small runs in tests)."""
        return dataclasses.replace(self, images=self.images[:count], labels=self.labels[:count])


def digits_dataset(split: str = "all", size: int = 32, channels: int = 1, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits as a :class:`Dataset` (see :func:`bkn.probes.data.load_digits`)."""
    from bkn.probes.data.digits import load_digits

    return Dataset(*load_digits(split, size, channels, seed), num_classes=10, name="digits")


def mnist1d_dataset(split: str = "all", num_samples: int = 5000, seed: int = 0) -> Dataset:
    """MNIST-1D generated locally as a :class:`Dataset` of ``(N, 1, 40)`` sequences (see
    :func:`bkn.probes.data.load_mnist1d`)."""
    from bkn.probes.data.mnist1d import load_mnist1d

    return Dataset(*load_mnist1d(split, num_samples, seed), num_classes=10, name="mnist1d")


def photos_dataset(size: int = 32, count: int = 1024, seed: int = 0) -> Dataset:
    """Crops of scikit-learn's sample photographs as a :class:`Dataset` (see :func:`bkn.probes.data.load_photos`)."""
    from bkn.probes.data.photos import NUM_CLASSES, load_photos

    return Dataset(*load_photos(size=size, count=count, seed=seed), num_classes=NUM_CLASSES, name="photos")
