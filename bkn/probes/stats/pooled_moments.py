"""Moments pooled over a whole data set: the accumulator, and the pooling over a per-sample norm's groups."""

from __future__ import annotations

import torch
from torch import nn

from bkn.probes.stats.layer_kinds import groups_of


class PooledMoments:
    """Pooled per-channel mean and biased variance of (N, C, *S) tensors, accumulated in float64.

    The sums are of ``x - shift`` with ``shift`` the first tensor's per-channel mean, so that
    ``S2 / n - (S1 / n)^2`` does not cancel where ``|mean| >> std`` (a one-pass formula on
    ``x`` itself would lose every digit of the variance there).
    """

    def __init__(self):
        self.count = 0
        self.shift = self.s1 = self.s2 = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [0] + list(range(2, x.dim()))
        if self.shift is None:
            self.shift = x.mean(dims)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros_like(self.shift)
        centred = x - self.shift.view([1, -1] + [1] * (x.dim() - 2))
        self.s1 += centred.sum(dims)
        self.s2 += centred.square().sum(dims)
        self.count += x.numel() // x.shape[1]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        m1 = self.s1 / self.count
        return m1 + self.shift, (self.s2 / self.count - m1 * m1).clamp_min(0)


def pool_over_groups(module: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel pooled moments -> the moments over each group's channels, repeated per channel.

    ``module`` is a per-sample norm (GroupNorm, LayerNorm, InstanceNorm); its groups set which
    channels are pooled. Channels of a group hold equally many values, so by the law of total
    variance the group's variance is the mean of the channel variances plus the variance of
    the channel means.
    """
    groups = groups_of(module, mean.numel())
    m = mean.view(groups, -1)
    group_mean = m.mean(1, keepdim=True)
    group_var = var.view(groups, -1).mean(1, keepdim=True) + (m - group_mean).square().mean(1, keepdim=True)
    size = m.shape[1]
    return group_mean.expand(groups, size).reshape(-1), group_var.expand(groups, size).reshape(-1)
