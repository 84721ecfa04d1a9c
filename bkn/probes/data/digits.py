"""scikit-learn's handwritten digits as image tensors (ships with scikit-learn; nothing is downloaded).

1797 grey 8x8 images of the digits 0-9, values 0..16. :func:`load_digits` upsamples
them (bilinear) to ``size`` x ``size``, optionally repeats the grey channel (the
CIFAR ResNet takes 3 channels), standardises with the *training* split's mean and
standard deviation, and splits train/test with a seeded permutation (stratified,
so both splits hold every class in its overall proportion).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "test", "all")


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cut = int(round(len(idx) * test_fraction))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(
    split: str = "all",
    size: int = 32,
    channels: int = 1,
    seed: int = 0,
    test_fraction: float = 0.25,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, channels, size, size)`` and labels ``(N,)`` (int64) of one split.

    Args:
        split: ``"train"``, ``"test"`` or ``"all"``.
        size: output side in pixels (8 = the original resolution).
        channels: 1 (grey) or 3 (the grey channel repeated).
        seed: seed of the train/test permutation (the same seed gives the same split).
        test_fraction: share of each class held out for ``"test"``.
    """
    if split not in SPLITS:
        raise ValueError(f"load_digits: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"load_digits: size must be an int >= 8 (the images are 8x8), got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"load_digits: channels must be 1 or 3, got {channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must lie in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _sklearn_digits  # a heavy import, only when needed

    bunch = _sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, test_idx = _stratified_split(bunch.target, test_fraction, seed)
    train = images[torch.from_numpy(train_idx)]
    mean, std = train.mean(), train.std()
    images = (images - mean) / std
    if channels == 3:
        images = images.expand(-1, 3, -1, -1)
    index = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    index = torch.from_numpy(index)
    return images[index].to(dtype).contiguous(), labels[index]
