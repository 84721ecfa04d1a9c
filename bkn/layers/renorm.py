"""Batch Renormalization (Ioffe, arXiv 1702.03275), docs/design.md §6.

In training mode a BRN layer normalizes with its batch statistics, then corrects
the result towards what its moving averages would give, with corrections that
are treated as constants by the gradient::

    sigma_B = sqrt(v_o + eps)
    r = stop_grad(clip(sigma_B / sigma, 1 / rmax, rmax))
    d = stop_grad(clip((m_o - mu) / sigma, -dmax, dmax))
    y = gamma * ((x - m_o) / sigma_B * r + d) + beta

    mu    += alpha * (m_o - mu)               # alpha = momentum (torch convention)
    sigma += alpha * (sigma_B - sigma)        # a moving *standard deviation*, not a variance

    inference: y = gamma * (x - mu) / sigma + beta

``m_o, v_o`` are the observed mean and biased variance per (group, channel).
``rmax = 1, dmax = 0`` is plain batch normalization (``r = 1``, ``d = 0``): the
training output and all gradients equal ``torch.nn.BatchNorm``'s (up to float rounding).

* Schedule: ``rmax``/``dmax`` are fixed floats (``BatchRenorm2d(C, rmax=3.0, dmax=5.0)``),
  or come from ``schedule``, a callable ``step -> (rmax, dmax)`` of the number of
  training-mode forwards seen (``num_batches_tracked`` before the current step, saved in
  the state dict). The default is the paper's schedule, :class:`RenormSchedule`: plain
  BN for 5k steps, then relaxed linearly to ``rmax = 3`` at 40k steps and ``dmax = 5``
  at 25k steps; ``RenormSchedule().scaled(total_steps)`` fits it to a shorter run.
* Running estimates: ``running_mean`` (mu), ``running_std`` (sigma, initialised to 1)
  and, derived from it, ``running_var = running_std**2 - eps``, so that the state dict
  holds everything ``torch.nn.BatchNorm`` keeps and inference is ``F.batch_norm`` with
  exactly ``gamma * (x - mu) / sigma + beta``. ``running_std`` is the source of truth;
  after writing ``running_var`` directly (e.g. copying a BN's buffers) call
  :meth:`sync_running_std`. A state dict without ``running_std`` (one of
  ``torch.nn.BatchNorm``) loads with ``running_std = sqrt(running_var + eps)``.
  ``momentum=None`` gives a cumulative average, as in torch.
* Micro-batch groups (docs/design.md §3): with ``group_size=g`` the statistics, ``r`` and ``d``
  are per (group, channel); each step the running estimates move towards the mean over
  groups of ``m_o`` and of ``sigma_B``.
* ``track_running_stats=False``: there are no moving averages to correct towards, so
  the layer is plain batch normalization (``r = 1, d = 0``) in training and evaluation.
* After a training-mode forward ``layer.last_rd = (r, d)`` and ``layer.last_stats``
  holds the *effective* statistics the layer normalized with (docs/design.md §9), detached, of
  shape (G, C): mean ``m_o - d * sigma_B / r`` and variance ``(sigma_B / r)**2 - eps``,
  i.e. ``y = gamma * (x - mean) / sqrt(var + eps) + beta``; the same convention as
  the other layers' ``last_stats`` (with ``r = 1, d = 0`` they are BN's ``m_o, v_o``).

Implementation: the training step, one group or several, is
:func:`bkn.layers._renorm_function.renorm_train` (autograd Functions on torch's native
batch-norm kernels, or compiled from ``bkn/csrc/_renorm_function.cpp`` on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ._base import BatchStatNorm, Dims1d, Dims2d, Dims3d
from ._renorm_function import renorm_train

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "RenormSchedule"]

Schedule = Callable[[int], "tuple[float, float]"]


@dataclass(frozen=True)
class RenormSchedule:
    """The paper's ``(rmax, dmax)`` schedule as a function of the training step.

    ``rmax = 1, dmax = 0`` (plain BN) for the first ``warmup_steps``; then both relax
    linearly, from the end of the warm-up, to ``rmax_max`` at step ``rmax_steps`` and to
    ``dmax_max`` at step ``dmax_steps``, and stay there::

        rmax(t) = 1 + (rmax_max - 1) * clip((t - warmup_steps) / (rmax_steps - warmup_steps), 0, 1)
        dmax(t) =          dmax_max  * clip((t - warmup_steps) / (dmax_steps - warmup_steps), 0, 1)

    Defaults are the paper's (5k, 40k, 25k steps; rmax 3, dmax 5).
    """

    warmup_steps: int = 5_000
    rmax_max: float = 3.0
    rmax_steps: int = 40_000
    dmax_max: float = 5.0
    dmax_steps: int = 25_000

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ValueError(f"RenormSchedule: warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.rmax_max >= 1.0:
            raise ValueError(f"RenormSchedule: rmax_max must be >= 1, got {self.rmax_max!r}")
        if not self.dmax_max >= 0.0:
            raise ValueError(f"RenormSchedule: dmax_max must be >= 0, got {self.dmax_max!r}")
        for name in ("rmax_steps", "dmax_steps"):
            if getattr(self, name) < self.warmup_steps:
                raise ValueError(
                    f"RenormSchedule: {name} must be >= warmup_steps={self.warmup_steps}, got {getattr(self, name)!r}"
                )

    def _ramp(self, step: int, end: int) -> float:
        if step <= self.warmup_steps:
            return 0.0
        if step >= end:
            return 1.0
        return (step - self.warmup_steps) / (end - self.warmup_steps)

    def __call__(self, step: int) -> tuple[float, float]:
        rmax = 1.0 + (self.rmax_max - 1.0) * self._ramp(step, self.rmax_steps)
        dmax = self.dmax_max * self._ramp(step, self.dmax_steps)
        return rmax, dmax

    def _tensor_ramp(self, step: torch.Tensor, end: int) -> torch.Tensor:
        if end <= self.warmup_steps:  # step <= warmup: 0; beyond: 1
            return (step > self.warmup_steps).double()
        ramp = (step - self.warmup_steps) / (end - self.warmup_steps)
        return torch.where(step <= self.warmup_steps, 0.0, torch.where(step >= end, 1.0, ramp))

    def on_device(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(step)`` for a 0-d integer tensor ``step``, as float64 0-d tensors on its device.

        No host sync (a training step must not read the step counter on the host); the values
        equal the float ones (the same float64 arithmetic).
        """
        step = step.double()
        rmax = 1.0 + (self.rmax_max - 1.0) * self._tensor_ramp(step, self.rmax_steps)
        dmax = self.dmax_max * self._tensor_ramp(step, self.dmax_steps)
        return rmax, dmax

    def scaled(self, total_steps: int, reference_steps: int = 40_000) -> "RenormSchedule":
        """The schedule stretched so that what it does in ``reference_steps`` happens in ``total_steps``.

        All step counts are multiplied by ``total_steps / reference_steps`` (rounded);
        with the default reference the relaxation ends at ``total_steps``.
        """
        if total_steps <= 0 or reference_steps <= 0:
            raise ValueError(
                f"RenormSchedule.scaled: steps must be positive, "
                f"got total_steps={total_steps!r}, "
                f"reference_steps={reference_steps!r}"
            )
        f = total_steps / reference_steps
        return replace(
            self,
            warmup_steps=round(self.warmup_steps * f),
            rmax_steps=round(self.rmax_steps * f),
            dmax_steps=round(self.dmax_steps * f),
        )


class _Fixed:
    """A constant ``(rmax, dmax)``; the layer recognises it and skips reading the step."""

    def __init__(self, rmax: float, dmax: float):
        self.rmax, self.dmax = rmax, dmax

    def __call__(self, step: int) -> tuple[float, float]:
        return self.rmax, self.dmax

    def __repr__(self) -> str:
        return f"rmax={self.rmax}, dmax={self.dmax}"


def _check_limits(owner: str, rmax, dmax) -> tuple[float, float]:
    try:
        rmax, dmax = float(rmax), float(dmax)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: rmax and dmax must be floats, got rmax={rmax!r}, dmax={dmax!r}") from None
    if not rmax >= 1.0:
        raise ValueError(f"{owner}: rmax must be >= 1, got {rmax!r}")
    if not dmax >= 0.0:
        raise ValueError(f"{owner}: dmax must be >= 0, got {dmax!r}")
    return rmax, dmax


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A (C,) statistic as (1, C); (G, C) ones as they are."""
    return t.unsqueeze(0) if t.dim() == 1 else t


class _BatchRenorm(BatchStatNorm):
    """Base of :class:`BatchRenorm1d`/``2d``/``3d`` (module docstring has the math).

    Args (besides those of :class:`bkn.layers.BatchStatNorm`):
        rmax: fixed bound of ``r`` (``>= 1``; ``inf``: no clipping). Give with ``dmax``.
        dmax: fixed bound of ``|d|`` (``>= 0``; ``inf``: no clipping). Give with ``rmax``.
        schedule: a callable ``step -> (rmax, dmax)`` of the number of training steps
            seen, instead of fixed bounds. Neither given: ``RenormSchedule()`` (the paper's).
    """

    def __init__(
        self,
        num_features: int,
        rmax: float | None = None,
        dmax: float | None = None,
        schedule: Schedule | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        group_size: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, group_size, device, dtype)
        name = type(self).__name__
        if (rmax is None) != (dmax is None):
            raise ValueError(
                f"{name}: give both rmax and dmax (fixed bounds) or neither, got rmax={rmax!r}, dmax={dmax!r}"
            )
        if rmax is not None and schedule is not None:
            raise ValueError(f"{name}: give either fixed rmax/dmax or a schedule, not both")
        if schedule is not None and not callable(schedule):
            raise ValueError(f"{name}: schedule must be a callable step -> (rmax, dmax), got {type(schedule).__name__}")
        if rmax is not None:
            schedule = _Fixed(*_check_limits(name, rmax, dmax))
        self.schedule: Schedule = RenormSchedule() if schedule is None else schedule
        if track_running_stats:
            self.register_buffer("running_std", torch.ones(num_features, device=device, dtype=dtype))
            self.sync_running_var()
        else:
            self.register_buffer("running_std", None)
        self._last_raw = None  # (m_o, sigma_B, r, d) of the last training forward

    @property
    def rmax(self) -> float | None:
        return self.schedule.rmax if isinstance(self.schedule, _Fixed) else None

    @property
    def dmax(self) -> float | None:
        return self.schedule.dmax if isinstance(self.schedule, _Fixed) else None

    def extra_repr(self) -> str:
        limits = repr(self.schedule) if isinstance(self.schedule, _Fixed) else f"schedule={self.schedule!r}"
        return f"{super().extra_repr()}, {limits}"

    # -- running estimates ------------------------------------------------------------
    @torch.no_grad()
    def sync_running_var(self) -> None:
        """Set ``running_var = running_std**2 - eps`` (what inference normalizes with)."""
        if self.running_std is not None:
            torch.mul(self.running_std, self.running_std, out=self.running_var).sub_(self.eps)

    @torch.no_grad()
    def sync_running_std(self) -> None:
        """Set ``running_std = sqrt(running_var + eps)``, after ``running_var`` was written directly."""
        if self.running_std is not None:
            torch.sqrt(self.running_var + self.eps, out=self.running_std)

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "running_std", None) is not None:
            self.running_std.fill_(1)
            self.sync_running_var()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key, var_key = prefix + "running_std", prefix + "running_var"
        if self.track_running_stats and key not in state_dict and var_key in state_dict:
            # A torch.nn.BatchNorm state dict: derive the moving std from its running_var.
            state_dict = dict(state_dict)
            state_dict[key] = torch.sqrt(state_dict[var_key].to(self.running_std.dtype) + self.eps)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def current_limits(self) -> tuple[float, float]:
        """``(rmax, dmax)`` the next training step will use."""
        if isinstance(self.schedule, _Fixed):
            return self.schedule.rmax, self.schedule.dmax
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        return _check_limits(f"{self.label} schedule at step {step}", *self.schedule(step))

    # -- statistics of the last training step -------------------------------------------
    @property
    def last_rd(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(r, d)`` of the last training forward, (G, C), detached; None after an eval forward."""
        raw = self.__dict__.get("_last_raw")
        return None if raw is None else (_rows(raw[2]), _rows(raw[3]))

    @property
    def last_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Effective (G, C) statistics of the last training forward, detached (docs/design.md §9).

        Mean ``m_o - d sigma_B / r`` and variance ``(sigma_B / r)^2 - eps``: the layer's
        output was ``gamma (x - mean) / sqrt(var + eps) + beta``.
        """
        raw = self.__dict__.get("_last_raw")
        if raw is None:
            return None
        obs_mean, std_b, r, d = (_rows(t) for t in raw)
        std = std_b / r
        return obs_mean - d * std, (std * std - self.eps).clamp_(min=0)

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self._check_input(x)
        if not self._uses_batch_stats():
            self.__dict__["_last_raw"] = None
            return self._normalize_eval(x)
        self._check_enough_values(x, groups)
        sigma_t = self._buffers["running_std"]
        if sigma_t is None:  # nothing to renormalize towards: plain BN
            y, mean, var = self._train_without_prior(x, groups)
            with torch.no_grad():
                std_b = torch.sqrt(var.detach() + self.eps)
            ones, zeros = torch.ones_like(std_b), torch.zeros_like(std_b)
            self.__dict__["_last_raw"] = (mean.detach(), std_b, ones, zeros)
            return y

        steps = self._buffers["num_batches_tracked"]
        if type(self.schedule) is RenormSchedule and steps is not None:
            rmax, dmax = self.schedule, None  # from the counter on the device (renorm_train); valid by construction
        else:
            rmax, dmax = self.current_limits()  # a custom schedule is called with an int: a host read
        p, b = self._parameters, self._buffers
        y, *raw = renorm_train(
            x,
            p["weight"],
            p["bias"],
            b["running_mean"],
            sigma_t,
            b["running_var"],
            b["num_batches_tracked"],
            self.momentum,
            rmax,
            dmax,
            self.eps,
            groups,
        )
        # A plain attribute through __dict__: nn.Module.__setattr__ costs ~6 us a call.
        self.__dict__["_last_raw"] = tuple(raw)  # (m_o, sigma_B, r, d)
        return y


class BatchRenorm1d(Dims1d, _BatchRenorm):
    r"""Batch Renormalization over (N, C) or (N, C, L) inputs.

    .. math::
        y = \gamma \left(\frac{x - m_o}{\sigma_B} r + d\right) + \beta,\quad
        r = \mathrm{sg}\,\mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B / \sigma),\quad
        d = \mathrm{sg}\,\mathrm{clip}_{[-d_{max}, d_{max}]}((m_o - \mu) / \sigma)

    See :class:`_BatchRenorm` and the module docstring.
    """


class BatchRenorm2d(Dims2d, _BatchRenorm):
    r"""Batch Renormalization over (N, C, H, W) inputs.

    .. math::
        y = \gamma \left(\frac{x - m_o}{\sigma_B} r + d\right) + \beta,\quad
        r = \mathrm{sg}\,\mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B / \sigma),\quad
        d = \mathrm{sg}\,\mathrm{clip}_{[-d_{max}, d_{max}]}((m_o - \mu) / \sigma)

    See :class:`_BatchRenorm` and the module docstring.
    """


class BatchRenorm3d(Dims3d, _BatchRenorm):
    r"""Batch Renormalization over (N, C, D, H, W) inputs.

    .. math::
        y = \gamma \left(\frac{x - m_o}{\sigma_B} r + d\right) + \beta,\quad
        r = \mathrm{sg}\,\mathrm{clip}_{[1/r_{max}, r_{max}]}(\sigma_B / \sigma),\quad
        d = \mathrm{sg}\,\mathrm{clip}_{[-d_{max}, d_{max}]}((m_o - \mu) / \sigma)

    See :class:`_BatchRenorm` and the module docstring.
    """
