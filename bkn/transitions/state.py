"""States that flow between normalization layers while a prior is propagated."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Per-(group, channel) mean and variance, shapes (G, C), plus the spatial size they describe."""

    mean: torch.Tensor
    var: torch.Tensor
    spatial: tuple[int, ...] = ()

    @property
    def channels(self) -> int:
        return self.mean.shape[-1]

    def pad_channels(self, before: int, after: int) -> "Moments":
        pad = (before, after)
        return Moments(torch.nn.functional.pad(self.mean, pad), torch.nn.functional.pad(self.var, pad), self.spatial)

    def __add__(self, other: "Moments") -> "Moments":
        # Independent summands: means add, variances add.
        return Moments(self.mean + other.mean, self.var + other.var, self.spatial or other.spatial)


@dataclass
class Sample:
    """A surrogate activation of shape (G * draws, C, *spatial): ``draws`` Monte-Carlo draws per group."""

    value: torch.Tensor
    draws: int = 1

    @property
    def channels(self) -> int:
        return self.value.shape[1]

    def moments(self) -> Moments:
        v = self.value
        groups = v.shape[0] // self.draws
        v = v.reshape(groups, self.draws, *v.shape[1:]).transpose(1, 2).reshape(groups, v.shape[1], -1)
        # Two passes (the mean, then the mean of centred squares): the biased variance, as
        # accurate as torch.var_mean's one-pass update and, with its backward, about 3x faster
        # on the CPU at the surrogate's sizes (it runs once per BKN layer per step).
        mean = v.mean(-1)
        centred = v - mean.unsqueeze(-1)
        var = (centred * centred).mean(-1)
        return Moments(mean, var, tuple(self.value.shape[2:]))
