"""Batch Kalman Normalization (Wang et al., arXiv 1802.03133), docs/design.md §1.

A BKN layer does not trust its micro-batch statistics alone. Given a *prior*
``(m_p, v_p)`` - a prediction of its statistics propagated from the previous
normalization layer (see :mod:`bkn.transitions`) - and a gain ``p`` it normalizes
with the posterior of a Kalman update (the official code's ``kalman_filter``)::

    m = p * m_p + (1 - p) * m_o
    v = p * v_p + (1 - p) * v_o + p * (1 - p) * (m_o - m_p)^2
    y = gamma * (x - m) / sqrt(v + eps) + beta

``v`` is the variance of the two-component mixture. Gradients flow through the
observed moments and through the prior (``detach_prior=True`` stops the latter).

* Guard: if ``mean over groups and channels of v_p / v_o >= guard`` (100) the layer
  uses the observation alone. With one value per channel and group the observed
  variance says nothing, so the guard is not applied (the prior carries the estimate).
* No prior (first layer of a chain, or no chain): plain batch normalization;
  ``p = 0`` reproduces ``torch.nn.BatchNorm2d`` (outputs, gradients, running stats).
* Running estimates: EMA (torch momentum convention) of the posterior, averaged over
  all groups (the official code averages only the first group's posterior), the
  variance scaled by ``n/(n-1)`` as torch does. Inference uses them; no prior.
* Micro-batch groups: ``group_size=g`` computes statistics per group of ``g`` samples
  with one prior per group (priors of shape ``(G, C)``) or a shared one ``(C,)``.

The prior is given per call, ``layer(x, prior=(mean, var))``, or supplied by a chain
(``bkn.convert`` and ``bkn.models`` set ``layer.prior_provider``). After a
training-mode forward ``layer.posterior`` holds ``(m, v)`` of shape (G, C)
(differentiable, for the next layer's prior), ``layer.observed`` the batch moments,
and ``layer.last_stats`` the detached statistics the layer normalized with.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._base import BatchStatNorm, Dims1d, Dims2d, Dims3d
from ._function import normalize_with_stats
from ._moments import batch_moments
from .gain import GAIN_KINDS, AdaptiveGain, FixedGain, make_gain

# The public transition names (bkn.transitions.NAMES; a test keeps the two equal without an import cycle).
TRANSITIONS = ("official", "official-affine", "official-relu-shortcut", "analytic", "identity")
MONTE_CARLO_TRANSITIONS = ("official", "official-affine", "official-relu-shortcut")

Prior = tuple[torch.Tensor, torch.Tensor]


class _BatchKalmanNorm(BatchStatNorm):
    """Base of :class:`BatchKalmanNorm1d`/``2d``/``3d``.

    Args (besides those of :class:`bkn.layers.BatchStatNorm`):
        p: the gain (fixed) or its initial value (learned); ignored by ``adaptive``.
        gain: ``"fixed"``, ``"learned"`` or ``"adaptive"`` (this project's extension).
        transition: how a chain propagates this layer's prior from the previous
            layer: ``"official"`` (Monte-Carlo through the next conv, as the authors'
            code), ``"analytic"`` (closed form), ``"identity"``, or an ablation of
            ``official`` (``"official-affine"``, ``"official-relu-shortcut"``: see
            :mod:`bkn.transitions.montecarlo`). Read by ``bkn.convert`` and
            ``bkn.models``; a layer used alone ignores it.
        guard: ratio ``mean(v_p / v_o)`` at or above which the prior is ignored
            (``None`` or ``inf`` disables the guard).
        detach_prior: stop gradients through the prior.
        draws: Monte-Carlo draws per group of the ``official*`` transitions (the official
            code: 1), read with ``transition`` by the chains; other transitions take 1.
    """

    def __init__(
        self,
        num_features: int,
        p: float = 0.9,
        gain: str = "fixed",
        transition: str = "official",
        guard: float | None = 100.0,
        detach_prior: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group_size: int | None = None,
        device=None,
        dtype=None,
        draws: int = 1,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, group_size, device, dtype)
        if gain not in GAIN_KINDS:
            raise ValueError(f"{type(self).__name__}: unknown gain {gain!r}; expected one of {', '.join(GAIN_KINDS)}")
        if transition not in TRANSITIONS:
            raise ValueError(
                f"{type(self).__name__}: unknown transition {transition!r}; expected one of {', '.join(TRANSITIONS)}"
            )
        if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
            raise ValueError(f"{type(self).__name__}: draws must be an int >= 1, got {draws!r}")
        if draws != 1 and transition not in MONTE_CARLO_TRANSITIONS:
            raise ValueError(
                f"{type(self).__name__}: draws={draws} needs a Monte-Carlo transition "
                f"({', '.join(MONTE_CARLO_TRANSITIONS)}); transition {transition!r} draws nothing"
            )
        if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be a float in [0, 1], got {p!r}")
        self.gain_kind = gain
        self.transition = transition
        self.draws = draws
        self.guard = math.inf if guard is None else float(guard)
        self.detach_prior = detach_prior
        self.gain = make_gain(
            gain, float(p), num_features, 0.1 if momentum is None else momentum, device=device, dtype=dtype
        )
        self.prior_provider: Callable[[], Prior | None] | None = None
        self.posterior: Prior | None = None
        self.observed: Prior | None = None
        self.prior_used: bool = False

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", gain={self.gain_kind}, transition={self.transition}, draws={self.draws}, "
            f"guard={self.guard}, detach_prior={self.detach_prior}"
        )

    def __getstate__(self):
        # The statistics of the last forward are transient (non-leaf tensors: deepcopy refuses
        # them); copies and pickles start without them, as a fresh layer does.
        state = self.__dict__.copy()
        state["posterior"] = state["observed"] = None
        state["prior_used"] = False
        return state

    def _set_stats(self, prior_used: bool, posterior: Prior | None, observed: Prior | None) -> None:
        # Plain attributes set through __dict__: nn.Module.__setattr__ costs ~6 us a call.
        d = self.__dict__
        d["prior_used"], d["posterior"], d["observed"] = prior_used, posterior, observed

    @property
    def last_stats(self) -> Prior | None:
        """The (G, C) statistics the last training forward normalized with (the posterior), detached."""
        return None if self.posterior is None else (self.posterior[0].detach(), self.posterior[1].detach())

    def _check_prior(self, prior, groups: int) -> Prior:
        if not (
            isinstance(prior, (tuple, list))
            and len(prior) == 2
            and isinstance(prior[0], torch.Tensor)
            and isinstance(prior[1], torch.Tensor)
        ):
            raise ValueError(f"{self.label}: prior must be a (mean, var) pair of tensors, got {type(prior).__name__}")
        mean, var = prior
        c = self.num_features
        for name, t in (("mean", mean), ("var", var)):
            shape = t.shape
            if shape != (c,) and shape != (groups, c):
                raise ValueError(
                    f"{self.label}: prior {name} must have shape ({c},) or "
                    f"({groups}, {c}) for {groups} group(s), got {tuple(shape)}"
                )
        # The prior variance (a negative or NaN one would make the posterior NaN) is checked on the device in
        # normalize_with_stats (check=label; in the Triton finalize kernel on that backend): no host sync on CUDA.
        if self.detach_prior:
            mean, var = mean.detach(), var.detach()
        return mean, var

    def forward(self, x: torch.Tensor, prior: Prior | None = None) -> torch.Tensor:
        groups = self._check_input(x)
        if not self._uses_batch_stats():
            self._set_stats(False, None, None)
            return self._normalize_eval(x)
        if prior is None and self.prior_provider is not None:
            prior = self.prior_provider()
        gain = self._modules["gain"]
        fixed = type(gain) is FixedGain
        if fixed and gain.p == 0.0:
            prior = None  # p = 0 ignores the prior: exactly BatchNorm
        if prior is None:
            y, mean, var = self._train_without_prior(x, groups)
            self._set_stats(False, (mean, var), (mean.detach(), var.detach()))
            return y
        prior = self._check_prior(prior, groups)
        observed = None
        if fixed:  # a float, read directly (a module call costs microseconds per layer)
            p = gain.p
        elif isinstance(gain, AdaptiveGain):
            with torch.no_grad():
                observed = batch_moments(x, groups)
            p = gain(x, observed[0], prior[0], x.shape[0] // groups)
        else:
            p = gain(x, None, prior[0], x.shape[0] // groups)
        one_value = self._values_per_channel(x, groups) < 2
        params = self._parameters
        y, mean, var, obs_mean, obs_var = normalize_with_stats(
            x,
            params["weight"],
            params["bias"],
            prior=prior,
            gain=p,
            observed=observed,
            groups=groups,
            eps=self.eps,
            guard=math.inf if one_value else self.guard,
            running=self._running_args(),
            check=self.label,
        )
        self._set_stats(True, (mean, var), (obs_mean, obs_var))
        return y


class BatchKalmanNorm1d(Dims1d, _BatchKalmanNorm):
    """BKN over (N, C) or (N, C, L) inputs. See :class:`_BatchKalmanNorm`."""


class BatchKalmanNorm2d(Dims2d, _BatchKalmanNorm):
    """BKN over (N, C, H, W) inputs. See :class:`_BatchKalmanNorm`."""


class BatchKalmanNorm3d(Dims3d, _BatchKalmanNorm):
    """BKN over (N, C, D, H, W) inputs. See :class:`_BatchKalmanNorm`."""
