"""Batch normalization with micro-batch groups ("ghost batches", docs/design.md §3).

``GhostBatchNorm2d(C, group_size=g)`` computes statistics per group of ``g``
consecutive samples, so the normalization batch size can be varied without
changing the SGD batch. With ``group_size=None`` it matches
``torch.nn.BatchNorm2d`` (the registry then returns the torch layer itself).
Running estimates average the groups' statistics at each step.
"""

from __future__ import annotations

import torch

from ._base import BatchStatNorm, Dims1d, Dims2d, Dims3d


class _GhostBatchNorm(BatchStatNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._check_input(x)
        if not self._uses_batch_stats():
            return self._normalize_eval(x)
        y, mean, var = self._train_without_prior(x, groups)
        self.last_stats = (mean.detach(), var.detach())
        return y


class GhostBatchNorm1d(Dims1d, _GhostBatchNorm):
    """Ghost-batch BN over (N, C) or (N, C, L) inputs."""


class GhostBatchNorm2d(Dims2d, _GhostBatchNorm):
    """Ghost-batch BN over (N, C, H, W) inputs."""


class GhostBatchNorm3d(Dims3d, _GhostBatchNorm):
    """Ghost-batch BN over (N, C, D, H, W) inputs."""
