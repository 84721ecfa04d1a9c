"""Closed-form propagation of per-channel moments (the ``analytic`` transition).

Rules, each exact for independent Gaussian inputs and an approximation otherwise
(the independence across positions and channels is the same assumption the
official Monte-Carlo construction makes):

* after a normalization layer with posterior ``(m, v)``: mean ``beta``,
  variance ``gamma^2 * v / (v + eps)`` (the normalized-and-affine activation);
  at its *input* (a residual stream that a pre-activation block normalizes): ``(m, v)``;
* ReLU of N(mu, s^2): ``E = mu Phi(a) + s phi(a)``, ``E2 = (mu^2 + s^2) Phi(a) + mu s phi(a)``,
  ``a = mu / s`` (rectified Gaussian); ReLU6 and Hardtanh: the clipped Gaussian
  (:func:`clip_moments`);
* other elementwise activations (SiLU, GELU, Mish, Hardswish, ELU, LeakyReLU, sigmoid,
  tanh, ...): the mean and variance of ``f(X)``, ``X ~ N(mu, s^2)``, by Gauss-Hermite
  quadrature through the network's own module (:func:`elementwise_moments`);
* convolution / linear with weights ``W``: mean ``sum_taps(W) @ mean + bias``,
  variance ``sum_taps(W^2) @ var`` (zero-padding at borders ignored);
* average pooling over ``A`` positions: mean kept, variance ``/ A``;
* max pooling over ``A`` positions: Gaussian moment matching, mean ``mu + s e_A``,
  variance ``s^2 d_A`` with ``e_A, d_A`` the mean and variance of the maximum of
  ``A`` standard normals (numerical quadrature);
* residual sums add means and variances; zero channel padding pads with zeros;
  concatenation along the channels concatenates the moments.

This module holds the transition (:class:`Analytic`: the rules applied to states, and the
dispatch on torch modules) and the pooling rules; the activation rules are in
:mod:`bkn.transitions.activation_moments`, the convolution rule and its compiled paths in
:mod:`bkn.transitions.convolution`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

# The rules live one job a file; their public names are re-exported here, where they always were.
from . import _backend
from .activation_moments import (
    _SQRT2,
    ELEMENTWISE,
    QUADRATURE_NODES,
    NormReluOutput,
    clip_moments,
    elementwise_moments,
    norm_relu_moments,
    relu_moments,
)
from .convolution import conv_moments, tap_sums
from .state import Moments, NormOutput, NormOutputSum, Sample
from .weight_grads import DeferredWeightGrads

__all__ = [
    "Analytic",
    "Unsupported",
    "ELEMENTWISE",
    "QUADRATURE_NODES",
    "clip_moments",
    "conv_moments",
    "elementwise_moments",
    "gaussian_max_moments",
    "norm_relu_moments",
    "pooled_spatial",
    "relu_moments",
    "tap_sums",
]


class Unsupported(Exception):
    """A module or function the transition cannot propagate through."""


def _ntuple(value, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pooled_spatial(spatial, kernel, stride, padding=0, dilation=1, ceil_mode=False):
    n = len(spatial)
    kernel, stride = _ntuple(kernel, n), _ntuple(stride if stride else kernel, n)
    padding, dilation = _ntuple(padding, n), _ntuple(dilation, n)
    out = []
    for s, k, st, p, d in zip(spatial, kernel, stride, padding, dilation):
        span = s + 2 * p - d * (k - 1) - 1
        out.append((-(-span // st) if ceil_mode else span // st) + 1)
    return tuple(out)


@lru_cache(maxsize=64)
def gaussian_max_moments(count: int) -> tuple[float, float]:
    """Mean and variance of the maximum of ``count`` i.i.d. standard normals (quadrature)."""
    x = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(x / _SQRT2))
    density = count * pdf * cdf.pow(count - 1)
    dx = float(x[1] - x[0])
    mean = float((x * density).sum() * dx)
    second = float((x * x * density).sum() * dx)
    return mean, second - mean * mean


_PROPAGATED = (
    *ELEMENTWISE,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)


class Analytic:
    """The ``analytic`` transition: deterministic moment propagation."""

    name = "analytic"
    shortcut = "activation"  # the CIFAR ResNet's first shortcut: moments of relu(norm0), see bkn.models.cifar_resnet

    @property
    def _weight_grads(self) -> DeferredWeightGrads:
        """This transition's deferred convolution-rule weight gradients (see :mod:`bkn.transitions.weight_grads`)."""
        registry = self.__dict__.get("_deferred")
        if registry is None:
            registry = self.__dict__["_deferred"] = DeferredWeightGrads()
        return registry

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Whether a state can be propagated through ``module`` (both transitions share the list)."""
        return isinstance(module, _PROPAGATED) and not isinstance(module, nn.modules.conv._ConvTransposeNd)

    def after_norm(self, layer, spatial: tuple[int, ...]) -> Moments:
        mean, var = layer.posterior
        if layer.weight is None:
            return Moments(torch.zeros_like(mean), var / (var + layer.eps), tuple(spatial))
        return NormOutput(var, layer.weight.to(var.dtype), layer.bias.to(mean.dtype), layer.eps, spatial)

    def at_input(self, layer, spatial: tuple[int, ...]) -> Moments:
        """The moments of the *input* of ``layer`` (which ran): its posterior ``(m, v)``."""
        mean, var = layer.posterior
        return Moments(mean, var, tuple(spatial))

    def to_prior(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        m = state.moments() if isinstance(state, Sample) else state
        return m.mean, m.var

    def relu(self, state: Moments) -> Moments:
        if isinstance(state, (NormOutput, NormOutputSum)):
            # relu right after a norm, or of a residual sum with a norm's output: one node (see _NormReluMoments)
            norm, extra = (state, None) if isinstance(state, NormOutput) else (state.norm, state.other)
            if _backend.backend(norm.posterior_var) == "triton":  # kept: a convolution next fuses both rules
                return NormReluOutput(norm, extra, state.spatial)
            return Moments(*norm_relu_moments(norm, extra=extra), state.spatial)
        return Moments(*relu_moments(state.mean, state.var), state.spatial)

    def add(self, a, b) -> Moments:
        a = a.moments() if isinstance(a, Sample) else a
        b = b.moments() if isinstance(b, Sample) else b
        if a.channels != b.channels:
            raise Unsupported(f"residual sum of {a.channels} and {b.channels} channels")
        if isinstance(a, NormOutput) or isinstance(b, NormOutput):  # kept as its parts (see NormOutputSum)
            norm, other = (a, b) if isinstance(a, NormOutput) else (b, a)
            return NormOutputSum(norm, other, a.spatial or b.spatial)
        return a + b

    def cat(self, states: list) -> Moments:
        """Concatenation along the channels (DenseNet): the channels' moments side by side."""
        states = [s.moments() if isinstance(s, Sample) else s for s in states]
        spatial = {s.spatial for s in states if s.spatial}
        if len(spatial) > 1:
            raise Unsupported(f"concatenation of features of different spatial sizes {sorted(spatial)}")
        mean = torch.cat([s.mean for s in states], -1)
        return Moments(mean, torch.cat([s.var for s in states], -1), next(iter(spatial), ()))

    def pad_channels(self, state, before: int, after: int) -> Moments:
        state = state.moments() if isinstance(state, Sample) else state
        return state.pad_channels(before, after)

    def conv(self, conv: nn.modules.conv._ConvNd, state: Moments) -> Moments:
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise Unsupported("transposed convolution")
        kept = isinstance(state, NormReluOutput)  # its moments not formed unless used (see NormReluOutput)
        w = conv.weight.to(state.norm.posterior_var.dtype if kept else state.mean.dtype)
        taps = tuple(range(2, w.dim()))
        if kept and not state.formed and w.dim() > 2:  # the Triton path: one node
            norm, extra = state.norm, state.extra
            mean, var = _backend.triton_functions().norm_relu_conv_moments(
                norm.posterior_var,
                norm.weight,
                norm.bias,
                norm.eps,
                None if extra is None else extra.mean,
                None if extra is None else extra.var,
                w,
                conv.groups,
                self._weight_grads,
            )
        else:  # one node (see _ConvMoments; the Triton kernels for any groups), or the tap sums and a product per group
            mean, var = conv_moments(w, state.mean, state.var, deferred=self._weight_grads, groups=conv.groups)
        if conv.bias is not None:
            mean = mean + conv.bias.to(mean.dtype)
        n = len(taps)
        if conv.padding == "same":
            spatial = state.spatial
        else:
            padding = (0,) * n if conv.padding == "valid" else _ntuple(conv.padding, n)
            spatial = tuple(
                _conv_out(s, k, st, p, d)
                for s, k, st, p, d in zip(state.spatial, conv.kernel_size, conv.stride, padding, conv.dilation)
            )
        return Moments(mean, var, spatial)

    def linear(self, linear: nn.Linear, state: Moments) -> Moments:
        if state.spatial and math.prod(state.spatial) != 1:
            raise Unsupported("linear layer on spatial features")
        w = linear.weight.to(state.mean.dtype)
        mean = state.mean @ w.t()
        if linear.bias is not None:
            mean = mean + linear.bias.to(mean.dtype)
        return Moments(mean, state.var @ w.square().t(), ())

    def avg_pool(self, state: Moments, kernel, stride, padding=0, ceil_mode=False) -> Moments:
        n = len(state.spatial)
        area = math.prod(_ntuple(kernel, n))
        spatial = pooled_spatial(state.spatial, kernel, stride, padding, 1, ceil_mode)
        return Moments(state.mean, state.var / area, spatial)

    def adaptive_avg_pool(self, state: Moments, output_size) -> Moments:
        n = len(state.spatial)
        out = tuple(s if o is None else o for s, o in zip(state.spatial, _ntuple(output_size, n)))
        area = math.prod(s / o for s, o in zip(state.spatial, out))
        return Moments(state.mean, state.var / max(area, 1.0), out)

    def max_pool(self, state: Moments, kernel, stride, padding=0, dilation=1, ceil_mode=False) -> Moments:
        n = len(state.spatial)
        area = math.prod(_ntuple(kernel, n))
        e, d = gaussian_max_moments(area)
        std = state.var.clamp_min(0).sqrt()
        return Moments(
            state.mean + std * e,
            state.var * d,
            pooled_spatial(state.spatial, kernel, stride, padding, dilation, ceil_mode),
        )

    def flatten(self, state: Moments) -> Moments:
        if state.spatial and math.prod(state.spatial) != 1:
            raise Unsupported("flatten of spatial features (channels would mix with positions)")
        return Moments(state.mean, state.var, ())

    # -- dispatch on torch modules, shared with the Monte-Carlo transition ------------------
    def module(self, module: nn.Module, state):
        if isinstance(state, Sample):
            state = state.moments()
        if isinstance(module, nn.ReLU):
            return self.relu(state)
        if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return Moments(*clip_moments(state.mean, state.var, module.min_val, module.max_val), state.spatial)
        if isinstance(module, ELEMENTWISE):
            return Moments(*elementwise_moments(module, state.mean, state.var), state.spatial)
        if isinstance(module, nn.modules.conv._ConvNd):
            return self.conv(module, state)
        if isinstance(module, nn.Linear):
            return self.linear(module, state)
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return self.avg_pool(state, module.kernel_size, module.stride, module.padding, module.ceil_mode)
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return self.adaptive_avg_pool(state, module.output_size)
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return self.max_pool(
                state, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode
            )
        if isinstance(module, nn.Flatten):
            return self.flatten(state)
        if isinstance(module, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
            return state
        raise Unsupported(type(module).__name__)
