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
"""

from __future__ import annotations

import torch
from torch import nn

from .analytic import Analytic, Unsupported
from .state import Moments, Sample

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class MonteCarlo(Analytic):
    """The ``official`` transition. ``draws`` surrogate samples per group (the official code: 1)."""

    name = "official"

    def __init__(self, draws: int = 1, generator: torch.Generator | None = None):
        if draws < 1:
            raise ValueError(f"MonteCarlo: draws must be >= 1, got {draws}")
        self.draws = draws
        self.generator = generator

    def after_norm(self, layer, spatial: tuple[int, ...]) -> Sample:
        mean, var = layer.posterior
        groups, channels = mean.shape
        shape = (groups * self.draws, channels, *spatial)
        z = torch.randn(shape, dtype=mean.dtype, device=mean.device, generator=self.generator)
        view = (groups, 1, channels) + (1,) * len(spatial)
        z = z.view(groups, self.draws, channels, *spatial)
        value = z * var.clamp_min(0).sqrt().view(view) + mean.view(view)
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
