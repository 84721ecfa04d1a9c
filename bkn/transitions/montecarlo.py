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

Ablations (each its own transition name, so results never mix them; docs/design.md §4):

* ``official-affine`` (``affine=True``): the surrogate is drawn from the previous
  layer's *output* distribution, ``gamma * z * sqrt(v / (v + eps)) + beta``, as the
  analytic transition propagates it, instead of ``z * sqrt(v) + m``;
* ``official-relu-shortcut`` (``shortcut="activation"``): in the hand-wired CIFAR
  ResNet (:mod:`bkn.models.cifar_resnet`) the first block's shortcut adds the moments of
  the post-ReLU activation ``relu(norm0(...))`` rather than ``norm0``'s pre-normalization
  posterior. Chains built by ``bkn.convert`` follow the traced graph, where a shortcut's
  statistics always come from the activation the graph adds: there it equals ``official``;
* ``draws``: Monte-Carlo draws per group (the official code: 1).

The *input* of a layer that already ran (a residual stream read by a pre-activation
block's first norm) is represented by a surrogate drawn from that layer's posterior,
``z * sqrt(v) + m`` (:meth:`MonteCarlo.at_input`), in every variant.

Cost: the surrogate goes through every convolution on the path, forward and backward,
``draws`` samples per group: with groups of 2 that is half the network's convolution work
again. ``surrogate_scale < 1`` (an option, not the authors' construction; default 1)
draws the surrogate with every spatial side scaled by it (``ceil(side * scale)``, at least
1), so the convolutions see ``scale^d`` of the positions. The prior is a spatial mean and
variance of i.i.d. positions, so its sampling noise grows by about ``scale^(-d/2)`` (x2 at
scale 0.5 in 2-d), and zero padding touches a larger share of a smaller map (a bias where
maps are already small: a 4x4 map drawn at 2x2 has no interior position).

Random streams. Without a ``generator`` the draws come from torch's default generator of
the activations' device. A given generator on the activations' device draws directly, as
it always did (the same seed gives the same CPU draws as before). A generator on another
device (the usual case: a CPU ``torch.Generator`` for a model on a GPU, where torch refuses
to mix them) is not used to draw the surrogate itself: each draw takes one 62-bit seed
from it and re-seeds a generator of the activations' device with it (one per device, kept
by the transition), which then draws. So the draws are a function of the given
generator's state (re-seeding it reproduces them, and every draw advances it), they are
made where the activations live (no host-side sampling nor copy of a surrogate as large
as an activation, and no wait for the device: the seed comes from the host generator),
but they are not the draws the same generator gives on the CPU: CPU and CUDA random
streams differ anyway. Drawing on the generator's device and copying over was the
alternative; it would make GPU draws equal CPU ones at the cost of sampling every
surrogate on the host and copying it at each step.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .analytic import Analytic, Unsupported
from .state import Moments, Sample

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


SHORTCUTS = ("posterior", "activation")


class MonteCarlo(Analytic):
    """The ``official`` transition and its ablations (see the module docstring).

    Args:
        draws: surrogate samples per group (the official code: 1).
        generator: the random stream of the draws (torch's global one by default); on another
            device than the activations it seeds a generator of theirs at each draw (see the
            module docstring).
        affine: draw the surrogate from the previous layer's output distribution
            (``official-affine``) instead of its pre-normalization posterior.
        shortcut: where the hand-wired CIFAR ResNet's first block takes its shortcut
            statistics from: ``"posterior"`` (norm0's pre-normalization posterior, the
            official code) or ``"activation"`` (``relu(norm0)``).
    """

    name = "official"

    def __init__(
        self,
        draws: int = 1,
        generator: torch.Generator | None = None,
        affine: bool = False,
        shortcut: str = "posterior",
        surrogate_scale: float = 1.0,
    ):
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"MonteCarlo: draws must be an int >= 1, got {draws!r}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"MonteCarlo: shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        if isinstance(surrogate_scale, bool) or not isinstance(surrogate_scale, (int, float)):
            raise ValueError(f"MonteCarlo: surrogate_scale must be a number in (0, 1], got {surrogate_scale!r}")
        if not 0.0 < surrogate_scale <= 1.0:
            raise ValueError(f"MonteCarlo: surrogate_scale must be a number in (0, 1], got {surrogate_scale!r}")
        self.draws = draws
        self.generator = generator
        self.affine = bool(affine)
        self.shortcut = shortcut
        self.surrogate_scale = float(surrogate_scale)
        self.name = "official" + ("-affine" if affine else "") + ("-relu-shortcut" if shortcut == "activation" else "")

    def _draw(self, mean: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, spatial) -> Sample:
        """``draws`` samples per group of ``z * scale + shift`` (shapes (G, C)), ``z ~ N(0, 1)`` of size ``spatial``."""
        groups, channels = mean.shape
        if self.surrogate_scale != 1.0:
            spatial = tuple(max(1, math.ceil(s * self.surrogate_scale)) for s in spatial)
        shape = (groups * self.draws, channels, *spatial)
        z = torch.randn(shape, dtype=mean.dtype, device=mean.device, generator=self._generator_on(mean.device))
        view = (groups, 1, channels) + (1,) * len(spatial)
        z = z.view(groups, self.draws, channels, *spatial)
        # One fused pass over the surrogate (shift + z * scale), not a product and then a sum.
        value = torch.addcmul(shift.view(view), z, scale.view(view))
        return Sample(value.reshape(shape), self.draws)

    def _generator_on(self, device: torch.device) -> torch.Generator | None:
        """The generator to draw on ``device`` with: the given one where it lives there, else a generator of
        ``device`` re-seeded from the given one (module docstring); ``None``: the device's default stream."""
        given = self.generator
        if given is None or given.device == device:
            return given
        seed = int(torch.randint(0, 2**62, (), generator=given, device=given.device))
        if device.type == "meta":
            return None  # meta tensors hold no values (and torch has no meta generator): the seed is still taken
        local = self.__dict__.setdefault("_device_generators", {})
        gen = local.get(device)
        if gen is None:
            gen = local[device] = torch.Generator(device)
        return gen.manual_seed(seed)

    def __getstate__(self):
        # The per-device generators are re-seeded at each draw: copies and pickles rebuild them when needed.
        state = self.__dict__.copy()
        state.pop("_device_generators", None)
        return state

    def at_input(self, layer, spatial: tuple[int, ...]) -> Sample:
        """A surrogate of the *input* of ``layer`` (which ran): ``z * sqrt(v) + m`` from its posterior."""
        mean, var = layer.posterior
        return self._draw(mean, var.clamp_min(0).sqrt(), mean, spatial)

    def after_norm(self, layer, spatial: tuple[int, ...]) -> Sample:
        """A surrogate of ``layer``'s output: ``z * sqrt(v) + m`` (official: pre-normalization statistics,
        gamma/beta skipped), or ``gamma * z * sqrt(v / (v + eps)) + beta`` with ``affine``."""
        if not self.affine:
            return self.at_input(layer, spatial)
        mean, var = layer.posterior
        scale = (var.clamp_min(0) / (var.clamp_min(0) + layer.eps)).sqrt()
        if layer.weight is None:
            return self._draw(mean, scale, torch.zeros_like(mean), spatial)
        gamma, beta = layer.weight.to(mean.dtype), layer.bias.to(mean.dtype)
        return self._draw(mean, gamma * scale, beta.expand_as(mean), spatial)

    def relu(self, state):
        return Sample(state.value.relu(), state.draws) if isinstance(state, Sample) else super().relu(state)

    def add(self, a, b):
        if isinstance(a, Sample) and isinstance(b, Sample) and a.value.shape == b.value.shape:
            return Sample(a.value + b.value, a.draws)
        return super().add(a, b)

    def cat(self, states: list):
        first = states[0]
        if all(isinstance(s, Sample) and s.draws == first.draws for s in states):
            shapes = {(s.value.shape[0], *s.value.shape[2:]) for s in states}
            if len(shapes) == 1:
                return Sample(torch.cat([s.value for s in states], 1), first.draws)
        return super().cat(states)

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
            if getattr(module, "inplace", False):
                # The surrogate state may have other readers in this forward (states are cached and
                # evaluated lazily, not in the network's order): never write over it.
                module = copy.copy(module)
                module.inplace = False
            # .forward, not __call__: the user's hooks must not see the surrogate.
            return Sample(module.forward(value), state.draws)
        raise Unsupported(type(module).__name__)

    def conv(self, conv, state):
        return self.module(conv, state)
