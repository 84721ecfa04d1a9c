"""Worker functions for the multi-worker training probe tests (module-level, so spawned processes import them)."""

from __future__ import annotations

import dataclasses

import torch

from bkn.probes.data import Dataset, digits_dataset
from bkn.probes.training import TrainConfig, train_model


def digits64(train_samples: int, test_samples: int) -> tuple[Dataset, Dataset]:
    """The probe's digits at 8x8 in float64 (the first samples of each split)."""
    train, test = digits_dataset("train", 8, 1, 0), digits_dataset("test", 8, 1, 0)
    return (
        dataclasses.replace(train.head(train_samples), images=train.images[:train_samples].double()),
        dataclasses.replace(test.head(test_samples), images=test.images[:test_samples].double()),
    )


def train_in_float64(rank: int, world_size: int, configs: list[TrainConfig], train_samples: int) -> list[dict]:
    """Train each config in float64 (default dtype) on this worker; each model's state and rows.

    Called by a spawned worker (``rank``, ``world_size`` of its process group) or in the
    test process itself for one worker.
    """
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        train, test = digits64(train_samples, 64)
        out = []
        for config in configs:
            model, rows = train_model(config, train, test)
            out.append({"state": {k: v.clone() for k, v in model.state_dict().items()}, "rows": rows})
        return out
    finally:
        torch.set_default_dtype(before)
