"""MNIST-1D (Greydanus 2020), generated locally with the ``mnist1d`` package (Apache-2.0; nothing is downloaded).

MNIST-1D is a 1-D analogue of MNIST: each sample is one of ten fixed 12-point digit
templates, padded, scaled, translated, sheared, with correlated and i.i.d. noise added,
then resampled to 40 points; the label is the template's digit. It is small enough to
train on a CPU in seconds, yet, unlike scikit-learn's digits, hard enough that a
network's accuracy depends on how it normalizes (issue 12: BN 95.4% at group 32, 89.0%
at group 2).

:func:`load_mnist1d` calls the package's own generator, ``mnist1d.data.make_dataset``
with its default arguments (``get_dataset_args()``) except ``num_samples`` and ``seed``,
and keeps its 80/20 train/test split. Never ``mnist1d.data.get_dataset`` (which
downloads a pickle from GitHub). The generator seeds numpy's and Python's global random
generators; their states are restored afterwards, so loading the data does not change
any other seeded draw of the caller. The package standardises the whole set (mean 0,
standard deviation 1 over all samples and positions), as its reference code does.
"""

from __future__ import annotations

import random

import numpy as np
import torch

SPLITS = ("train", "test", "all")
LENGTH = 40  # the package's final_seq_length
TRAIN_SPLIT = 0.8  # the package's train_split


def load_mnist1d(
    split: str = "all", num_samples: int = 5000, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences ``(N, 1, 40)`` and labels ``(N,)`` (int64) of one split of a generated MNIST-1D.

    Args:
        split: ``"train"`` (the first 80% of the shuffled samples), ``"test"`` (the rest) or ``"all"``.
        num_samples: samples generated in all (a multiple of 10: the same number per digit).
        seed: the generator's seed: the same seed and size give the same data, bit for bit.
    """
    if split not in SPLITS:
        raise ValueError(f"load_mnist1d: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 10 or num_samples % 10:
        raise ValueError(
            f"load_mnist1d: num_samples must be a positive multiple of 10 (samples per digit x 10), got {num_samples!r}"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"load_mnist1d: seed must be a non-negative int, got {seed!r}")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError(
            f"load_mnist1d: the mnist1d package is needed to generate MNIST-1D ({exc}); "
            "pip install -e '.[probes]' installs it"
        ) from exc
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)  # seeds numpy's and Python's global generators with args.seed
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    x = {"train": data["x"], "test": data["x_test"], "all": np.concatenate([data["x"], data["x_test"]])}[split]
    y = {"train": data["y"], "test": data["y_test"], "all": np.concatenate([data["y"], data["y_test"]])}[split]
    images = torch.from_numpy(np.ascontiguousarray(x)).to(dtype).unsqueeze(1)  # (N, 1, 40)
    return images.contiguous(), torch.from_numpy(np.asarray(y, dtype=np.int64))
