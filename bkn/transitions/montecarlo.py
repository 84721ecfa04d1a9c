"""Monte-Carlo propagation of a surrogate activation (the ``official`` transition).

As the authors' code: from the posterior ``(m, v)`` of the previous normalization
layer (its *pre*-normalization statistics; gamma and beta are skipped), draw one
surrogate input per group ``z * sqrt(v) + m``, ``z ~ N(0, 1)`` of the layer's
spatial size, push it through the same modules as the real activations (ReLU, the
next convolution with shared weights, pooling, residual sums), and take the
per-channel mean and biased variance of the result over spatial positions as the
next layer's prior. Gradients flow through the shared weights and the posterior.

Known weak points (kept on purpose; the drift probe must be able to show them):
pre-normalization statistics and no gamma/beta, few spatial positions (noisy), and
independence across positions and channels.

Cost: the surrogate goes through every convolution on the path, forward and backward,
``draws`` samples per group: with groups of 2 that is half the network's convolution work
again. ``surrogate_scale < 1`` (an option, not the authors' construction; default 1)
draws the surrogate with every spatial side scaled by it (``ceil(side * scale)``, at least
1), so the convolutions see ``scale^d`` of the positions. The prior is a spatial mean and
variance of i.i.d. positions, so its sampling noise grows by about ``scale^(-d/2)`` (x2 at
scale 0.5 in 2-d), and zero padding touches a larger share of a smaller map (a bias where
maps are already small: a 4x4 map drawn at 2x2 has no interior position).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .analytic import Analytic, Unsupported
from .state import Moments, Sample

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class MonteCarlo(Analytic):
    """The ``official`` transition. ``draws`` surrogate samples per group (the official code: 1)."""

    name = "official"

    def __init__(self, draws: int = 1, generator: torch.Generator | None = None, surrogate_scale: float = 1.0):
        if draws < 1:
            raise ValueError(f"MonteCarlo: draws must be >= 1, got {draws}")
        if not isinstance(surrogate_scale, (int, float)) or not 0.0 < surrogate_scale <= 1.0:
            raise ValueError(f"MonteCarlo: surrogate_scale must be a number in (0, 1], got {surrogate_scale!r}")
        self.draws = draws
        self.generator = generator
        self.surrogate_scale = float(surrogate_scale)

    def after_norm(self, layer, spatial: tuple[int, ...]) -> Sample:
        mean, var = layer.posterior
        groups, channels = mean.shape
        if self.surrogate_scale != 1.0:
            spatial = tuple(max(1, math.ceil(s * self.surrogate_scale)) for s in spatial)
        shape = (groups * self.draws, channels, *spatial)
        z = torch.randn(shape, dtype=mean.dtype, device=mean.device, generator=self.generator)
        view = (groups, 1, channels) + (1,) * len(spatial)
        z = z.view(groups, self.draws, channels, *spatial)
        # One fused pass over the surrogate (mean + z * std), not a product and then a sum.
        value = torch.addcmul(mean.view(view), z, var.clamp_min(0).sqrt().view(view))
        return Sample(value.reshape(shape), self.draws)

    def relu(self, state):
        return Sample(state.value.relu(), state.draws) if isinstance(state, Sample) else super().relu(state)

    def add(self, a, b):
        if isinstance(a, Sample) and isinstance(b, Sample) and a.value.shape == b.value.shape:
            return Sample(a.value + b.value, a.draws)
        return super().add(a, b)

    def pad_channels(self, state, before: int, after: int):
        if isinstance(state, Sample):
            pad = (0, 0) * (state.value.dim() - 2) + (before, after)
            return Sample(torch.nn.functional.pad(state.value, pad), state.draws)
        return super().pad_channels(state, before, after)

    def module(self, module: nn.Module, state):
        if isinstance(state, Moments):
            return super().module(module, state)  # e.g. after a residual sum of moments
        if isinstance(module, _DROPOUT):
            return state  # the surrogate is a statistic, not an activation: no dropout noise
        if self.supports(module):
            value = state.value
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and value.dtype != weight.dtype:
                value = value.to(weight.dtype)  # a prior-fed BKN layer's posterior is float32 for bfloat16 inputs
            # .forward, not __call__: the user's hooks must not see the surrogate.
            return Sample(module.forward(value), state.draws)
        raise Unsupported(type(module).__name__)

    def conv(self, conv, state):
        return self.module(conv, state)
