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


def affine_output_moments(var, weight, bias, eps: float):
    """``(mean, variance, v / (v + eps))`` of a norm's affine output ``gamma (x - m) / sqrt(v + eps) + beta``
    for ``x ~ N(m, v)``, per (group, channel): ``beta`` (expanded over the groups), ``gamma^2 v / (v + eps)``."""
    normalized = var / (var + eps)
    return bias.expand_as(var), weight.square() * normalized, normalized


class _LazyMoments(Moments):
    """Moments kept as the parts they are computed from, ``mean`` and ``var`` formed (with
    autograd) on first use by :meth:`_form`: a transition that knows the parts can take a
    rule of them in one autograd node instead."""

    _moments = None

    def _form(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def mean(self) -> torch.Tensor:  # noqa: D102 (Moments' field)
        if self._moments is None:
            self._moments = self._form()
        return self._moments[0]

    @property
    def var(self) -> torch.Tensor:  # noqa: D102
        if self._moments is None:
            self._moments = self._form()
        return self._moments[1]


class NormOutput(_LazyMoments):
    """The moments of a norm layer's affine output ``gamma * (x - m) / sqrt(v + eps) + beta`` for
    ``x ~ N(m, v)`` (its posterior): mean ``beta``, variance ``gamma^2 v / (v + eps)``, per (group, channel).

    Kept as the layer's tensors, so that a ReLU right after the norm (the usual case) can take
    the moments of ``relu`` of it in one autograd node
    (:func:`bkn.transitions.analytic.norm_relu_moments`) instead of some seven.
    """

    def __init__(self, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, spatial=()):
        self.posterior_var, self.weight, self.bias, self.eps = var, weight, bias, eps
        self.spatial = tuple(spatial)

    def _form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return affine_output_moments(self.posterior_var, self.weight, self.bias, self.eps)[:2]

    @property
    def channels(self) -> int:
        return self.posterior_var.shape[-1]


class NormOutputSum(_LazyMoments):
    """A residual sum with a norm's affine output: ``norm`` (:class:`NormOutput`) plus ``other`` (any
    moments state), independent summands, so means add and variances add.

    Kept as its two parts, so that the ReLU after a residual sum (``relu(bn2(conv2(...)) +
    identity)`` in a ResNet block) takes the moments of ``relu`` of the sum in one autograd node
    (:func:`bkn.transitions.analytic.norm_relu_moments` with ``extra``) instead of some ten.
    """

    def __init__(self, norm: NormOutput, other: Moments, spatial=()):
        self.norm, self.other, self.spatial = norm, other, tuple(spatial)

    def _form(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.norm.mean + self.other.mean, self.norm.var + self.other.var

    @property
    def channels(self) -> int:
        return self.norm.channels


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
