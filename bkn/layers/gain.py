"""Kalman gains: how much weight ``p`` a BKN layer puts on its prior (docs/design.md §2).

* ``FixedGain``    - a constant ``p`` (the official scripts: 0.9 for micro-batches of 2,
  0.05 for batch 128).
* ``LearnedGain``  - one scalar per layer, ``p = sigmoid(theta)``, trained by SGD with the
  rest of the network (gradients reach ``theta`` through the mixture).
* ``AdaptiveGain`` - this project's extension, not the paper's: a per-channel Kalman
  gain from two uncertainties, re-estimated at every training step:

  ``U_obs``  the sampling variance of the observed group mean. Pixels of one image are
  strongly correlated, so H*W is not the effective sample count; instead the spread
  of *per-sample* means is used: ``s2 = unbiased variance over the N samples of the
  batch of mean_{H,W}(x_n)``, tracked as an exponential moving average (so a batch of
  one sample still has an estimate), and ``U_obs = s2 / group_size``.

  ``U_prior`` the prediction's error variance. The innovation ``e = m_o - m_p`` has
  ``E[e^2] = U_prior + U_obs`` when observation noise and prediction error are
  independent, so ``U_prior = max(EMA(e^2) - U_obs, 0)``.

  ``p = U_obs / (U_obs + U_prior)``: a noisy observation (small group) pushes ``p``
  towards 1, an unreliable prediction towards 0. The gain is computed from the
  estimates *before* the current batch is folded in (the first batch initialises
  them), and it is a statistic, not a parameter: no gradient flows into it.

Gains are submodules of their layer: ``make_gain`` takes the layer's ``device`` and
``dtype`` (factory keyword arguments, as torch's layers take them), so a layer built on
an accelerator has its gain there too, and ``layer.to(...)`` moves it with the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ._base import logit
from ._moments import sample_means

GAIN_KINDS = ("fixed", "learned", "adaptive")


class FixedGain(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"FixedGain: p must lie in [0, 1], got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor, obs_mean: torch.Tensor | None, prior_mean: torch.Tensor, group_size: int):
        return self.p  # a float keeps the fused Function's per-channel algebra cheap

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LearnedGain(nn.Module):
    def __init__(self, p: float, device=None, dtype=None):
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"LearnedGain: initial p must lie in (0, 1), got {p!r}")
        self.logit = nn.Parameter(torch.tensor(logit(p), device=device, dtype=dtype))

    def forward(self, x, obs_mean, prior_mean, group_size):
        return torch.sigmoid(self.logit)

    @property
    def p(self) -> float:
        return float(torch.sigmoid(self.logit.detach()))


class AdaptiveGain(nn.Module):
    def __init__(self, num_features: int, momentum: float = 0.1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.momentum = momentum
        self.register_buffer("sample_mean_var", torch.zeros(num_features, **factory))
        self.register_buffer("innovation_sq", torch.zeros(num_features, **factory))
        self.register_buffer("initialised", torch.tensor(False, device=device))
        self.group_size = 1  # of the last forward: U_obs shrinks with it, and ``p`` reports that gain

    @torch.no_grad()
    def forward(self, x, obs_mean, prior_mean, group_size):
        self.group_size = group_size
        means = sample_means(x)
        innovation_sq = (obs_mean - prior_mean.to(obs_mean.dtype)).square().mean(0)
        spread = means.var(0, unbiased=True) if means.shape[0] > 1 else None
        # The first forward initialises the estimates. Selected on the device (``torch.where`` on
        # the flag) rather than branched on ``bool(self.initialised)``, which would wait for the
        # accelerator at every training step; the values are the same either way.
        done = self.initialised
        first_spread = spread if spread is not None else torch.zeros_like(innovation_sq)
        self.sample_mean_var.copy_(torch.where(done, self.sample_mean_var, first_spread))
        self.innovation_sq.copy_(torch.where(done, self.innovation_sq, innovation_sq))
        done.fill_(True)
        p = self._gain(self.sample_mean_var / group_size)
        if self.training:
            if spread is not None:
                self.sample_mean_var.lerp_(spread.to(self.sample_mean_var.dtype), self.momentum)
            self.innovation_sq.lerp_(innovation_sq.to(self.innovation_sq.dtype), self.momentum)
        return p

    @property
    def p(self) -> torch.Tensor:
        """The per-channel gain a training forward at the last group size would use now."""
        return self._gain(self.sample_mean_var / self.group_size)

    def _gain(self, u_obs: torch.Tensor) -> torch.Tensor:
        u_prior = (self.innovation_sq - u_obs).clamp_min(0)
        return u_obs / (u_obs + u_prior).clamp_min(torch.finfo(u_obs.dtype).tiny)


def make_gain(kind: str, p: float, num_features: int, momentum: float = 0.1, device=None, dtype=None) -> nn.Module:
    """The gain ``kind`` with its tensors created on ``device`` in ``dtype`` (the layer's factory arguments)."""
    if kind == "fixed":
        return FixedGain(p)  # a float: nothing to place
    if kind == "learned":
        return LearnedGain(p, device, dtype)
    if kind == "adaptive":
        return AdaptiveGain(num_features, momentum, device, dtype)
    raise ValueError(f"unknown gain {kind!r}; expected one of {', '.join(GAIN_KINDS)}")
