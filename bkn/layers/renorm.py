"""Batch Renormalization (Ioffe, arXiv 1702.03275), spec section 2.

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
* Micro-batch groups (spec 1.3): with ``group_size=g`` the statistics, ``r`` and ``d``
  are per (group, channel); each step the running estimates move towards the mean over
  groups of ``m_o`` and of ``sigma_B``.
* ``track_running_stats=False``: there are no moving averages to correct towards, so
  the layer is plain batch normalization (``r = 1, d = 0``) in training and evaluation.
* After a training-mode forward ``layer.last_rd = (r, d)`` and ``layer.last_stats``
  holds the *effective* statistics the layer normalized with (spec 4), detached, of
  shape (G, C): mean ``m_o - d * sigma_B / r`` and variance ``(sigma_B / r)**2 - eps``,
  i.e. ``y = gamma * (x - mean) / sqrt(var + eps) + beta``; the same convention as
  the other layers' ``last_stats`` (with ``r = 1, d = 0`` they are BN's ``m_o, v_o``).

Implementation: with ``r, d`` constant, BRN's output is batch normalization with the
affine ``gamma * r`` and ``beta + gamma * d``. One group (the usual case) runs on torch's
native batch-norm kernels (:class:`_Renorm`: moments, an eval-mode normalize pass, BN's own
backward kernel), with the per-channel algebra on numpy views on the CPU, or all of it
compiled (``Renorm`` in ``bkn/csrc/fused_norm.cpp``, see :mod:`bkn.layers._native`) on the
CPU in float32/float64 when that could be built; several groups
use the project's fused Function (:func:`bkn.layers._function.normalize_with_stats`) with
a per-(group, channel) affine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from . import _native
from ._base import BatchStatNorm, Dims1d, Dims2d, Dims3d
from ._function import normalize_with_stats
from ._moments import batch_moments, centred_var, ill_conditioned

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
                raise ValueError(f"RenormSchedule: {name} must be >= warmup_steps={self.warmup_steps}, "
                                 f"got {getattr(self, name)!r}")

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

    def scaled(self, total_steps: int, reference_steps: int = 40_000) -> "RenormSchedule":
        """The schedule stretched so that what it does in ``reference_steps`` happens in ``total_steps``.

        All step counts are multiplied by ``total_steps / reference_steps`` (rounded);
        with the default reference the relaxation ends at ``total_steps``.
        """
        if total_steps <= 0 or reference_steps <= 0:
            raise ValueError(f"RenormSchedule.scaled: steps must be positive, "
                             f"got total_steps={total_steps!r}, "
                             f"reference_steps={reference_steps!r}")
        f = total_steps / reference_steps
        return replace(self, warmup_steps=round(self.warmup_steps * f), rmax_steps=round(self.rmax_steps * f),
                       dmax_steps=round(self.dmax_steps * f))


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


# The CPU fast path of a single group: per-channel algebra on numpy views (a torch call on
# a vector of a few hundred floats costs some 4 us, a numpy one under 1 us; see
# ``bkn.layers._function.per_channel``) and one pass over ``x`` for its moments.
# Tests switch it off to exercise the torch algebra (the path used on GPUs). Both are used
# only where the compiled kernels (bkn/csrc/fused_norm.cpp, ``Renorm``) are off or do not
# take the tensors (see bkn.layers._native).
_NUMPY_FAST_PATH = True


_bn_backward = torch.ops.aten.native_batch_norm_backward
_NUMPY_DTYPES = (torch.float32, torch.float64)


class _Renorm(torch.autograd.Function):
    """BRN's training forward and backward for one group, on torch's native batch-norm kernels.

    With constant ``r, d`` the output is batch normalization with the affine
    ``scale = gamma r``, ``shift = beta + gamma d``, so::

        forward:  y = eval-mode batch_norm(x, scale, shift, m_o, v_o)              (one fused pass)
        backward: dx, dscale, dshift = native_batch_norm_backward(train=True)   (BN's own kernel)
                  dgamma = r dscale + d dshift,  dbeta = dshift

    The per-channel inputs, shape (C,), are precomputed and carry no gradient;
    ``rd = (r, d)`` holds two tensors, or two numpy arrays on the CPU fast path.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, invstd, scale, shift, rd, eps):
        y = torch.batch_norm(x, scale, shift, mean, var, False, 0.0, eps, True)
        ctx.save_for_backward(x, scale, mean, invstd)
        ctx.rd, ctx.eps = rd, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, invstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dscale, dshift = _bn_backward(
            dy, x, scale, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_w or need_b])
        dweight = None
        if need_w:
            r, d = ctx.rd
            if isinstance(r, np.ndarray):
                dweight = torch.from_numpy(dscale.numpy() * r + dshift.numpy() * d)
            else:
                dweight = torch.addcmul(dscale * r, dshift, d)
        return dx, dweight, dshift if need_b else None, None, None, None, None, None, None, None


def _as_tensor(a, rows: bool = False) -> torch.Tensor:
    """A numpy array (no copy) or tensor; ``rows``: (C,) becomes (1, C)."""
    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return t.unsqueeze(0) if rows and t.dim() == 1 else t


class _BatchRenorm(BatchStatNorm):
    """Base of :class:`BatchRenorm1d`/``2d``/``3d`` (module docstring has the math).

    Args (besides those of :class:`bkn.layers.BatchStatNorm`):
        rmax: fixed bound of ``r`` (``>= 1``; ``inf``: no clipping). Give with ``dmax``.
        dmax: fixed bound of ``|d|`` (``>= 0``; ``inf``: no clipping). Give with ``rmax``.
        schedule: a callable ``step -> (rmax, dmax)`` of the number of training steps
            seen, instead of fixed bounds. Neither given: ``RenormSchedule()`` (the paper's).
    """

    def __init__(self, num_features: int, rmax: float | None = None, dmax: float | None = None,
                 schedule: Schedule | None = None, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group_size: int | None = None,
                 device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, group_size, device, dtype)
        name = type(self).__name__
        if (rmax is None) != (dmax is None):
            raise ValueError(f"{name}: give both rmax and dmax (fixed bounds) or neither, "
                             f"got rmax={rmax!r}, dmax={dmax!r}")
        if rmax is not None and schedule is not None:
            raise ValueError(f"{name}: give either fixed rmax/dmax or a schedule, not both")
        if schedule is not None and not callable(schedule):
            raise ValueError(f"{name}: schedule must be a callable step -> (rmax, dmax), "
                             f"got {type(schedule).__name__}")
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key, var_key = prefix + "running_std", prefix + "running_var"
        if self.track_running_stats and key not in state_dict and var_key in state_dict:
            # A torch.nn.BatchNorm state dict: derive the moving std from its running_var.
            state_dict = dict(state_dict)
            state_dict[key] = torch.sqrt(state_dict[var_key].to(self.running_std.dtype) + self.eps)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

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
        return None if raw is None else (_as_tensor(raw[2], True), _as_tensor(raw[3], True))

    @property
    def last_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Effective (G, C) statistics of the last training forward, detached (spec 4).

        Mean ``m_o - d sigma_B / r`` and variance ``(sigma_B / r)^2 - eps``: the layer's
        output was ``gamma (x - mean) / sqrt(var + eps) + beta``.
        """
        raw = self.__dict__.get("_last_raw")
        if raw is None:
            return None
        obs_mean, std_b, r, d = (_as_tensor(a, True) for a in raw)
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

        rmax, dmax = self.current_limits()
        params, eps = self._parameters, self.eps
        weight, bias = params["weight"], params["bias"]
        single = groups == 1 and x.dtype == sigma_t.dtype and (weight is None or weight.dtype == x.dtype)
        native = _native.load() if single else None
        out = None
        if native is not None:  # [] when the compiled path does not take these tensors
            b = self._buffers
            momentum = self.momentum
            out = native.renorm(x, weight, bias, b["running_mean"], sigma_t, b["running_var"],
                                b["num_batches_tracked"], math.nan if momentum is None else momentum, rmax, dmax, eps)
        if out:
            y, *stats = out
            raw = tuple(stats)  # (m_o, sigma_B, r, d)
        elif single and _NUMPY_FAST_PATH and x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES:
            args, raw = self._single_group_numpy(x.detach(), rmax, dmax)
            y = _Renorm.apply(x, weight, bias, *args, eps)
        else:
            self.num_batches_tracked.add_(1)
            factor = self._ema_factor()
            with torch.no_grad():
                mean, var = batch_moments(x, groups)
                std_b, r, d = self._corrections(mean, var, rmax, dmax, factor)
            raw = (mean, std_b, r, d)
            if single:
                with torch.no_grad():
                    r0, d0 = r[0], d[0]
                    if weight is None:
                        scale, shift = r0, d0
                    else:
                        scale, shift = weight * r0, torch.addcmul(bias, weight, d0)
                    invstd = std_b[0].reciprocal()
                y = _Renorm.apply(x, weight, bias, mean[0], var[0], invstd, scale, shift, (r0, d0), eps)
            else:
                # Groups: the shared Function, with the constant corrections folded into
                # a per-(group, channel) affine ``gamma r, beta + gamma d`` (autograd ops).
                if weight is None:
                    weight, bias = r, d
                else:
                    bias = torch.addcmul(bias, weight, d)
                    weight = weight * r
                y = normalize_with_stats(x, weight, bias, observed=(mean, var), groups=groups, eps=eps)[0]
        # A plain attribute through __dict__: nn.Module.__setattr__ costs ~6 us a call.
        self.__dict__["_last_raw"] = raw
        return y

    def _corrections(self, mean, var, rmax: float, dmax: float, factor: float):
        """``sigma_B, r, d`` (G, C) from (G, C) moments and the running estimates, which are then updated."""
        mu_t, sigma_t = self.running_mean, self.running_std
        std_b = torch.sqrt(var + self.eps)
        sigma = sigma_t.to(std_b.dtype)
        r = (std_b / sigma).clamp_(1.0 / rmax, rmax)
        d = ((mean - mu_t.to(mean.dtype)) / sigma).clamp_(-dmax, dmax)
        # Running estimates: towards the mean over groups of m_o and of sigma_B.
        mu_t.lerp_(mean.mean(0).to(mu_t.dtype), factor)
        sigma_t.lerp_(std_b.mean(0).to(sigma_t.dtype), factor)
        self.sync_running_var()
        return std_b, r, d

    def __getstate__(self):
        # Copies (deepcopy, pickle) must not inherit numpy views of this layer's tensors.
        state = super().__getstate__()
        state.pop("_np_cache", None)
        return state

    def _numpy_views(self):
        """Numpy views of the buffers and affine parameters (and a ones vector), cached.

        The key is the tensors' data pointers: a ``.to()``, ``.double()`` or an assignment
        moves the data, and the cached views keep the old storage alive, so a pointer seen
        again is the same storage. (Copies drop the cache: see ``__getstate__``.)
        """
        b, p = self._buffers, self._parameters
        mu, sigma, rv, w, bias = b["running_mean"], b["running_std"], b["running_var"], p["weight"], p["bias"]
        steps = b["num_batches_tracked"]
        key = (mu.data_ptr(), sigma.data_ptr(), rv.data_ptr(), 0 if w is None else w.data_ptr(),
               0 if bias is None else bias.data_ptr(), steps.data_ptr())
        cache = self.__dict__.get("_np_cache")
        if cache is None or cache[0] != key:
            views = (mu.numpy(), sigma.numpy(), rv.numpy(), None if w is None else w.detach().numpy(),
                     None if bias is None else bias.detach().numpy(), steps.numpy(), torch.ones_like(mu))
            cache = self.__dict__["_np_cache"] = (key, views)
        return cache[1]

    def _bounds(self, rmax: float, dmax: float, dtype):
        """(2, 1) upper and lower bounds of the rows ``(r, d)``, cached for the last ``(rmax, dmax)``."""
        cache = self.__dict__.get("_bounds_cache")
        if cache is None or cache[0] != (rmax, dmax, dtype):
            bounds = (np.array([[rmax], [dmax]], dtype), np.array([[1.0 / rmax], [-dmax]], dtype))
            cache = self.__dict__["_bounds_cache"] = ((rmax, dmax, dtype), bounds)
        return cache[1]

    def _single_group_numpy(self, x: torch.Tensor, rmax: float, dmax: float):
        """:meth:`_corrections` and the inputs of :class:`_Renorm` for one group on the CPU, in numpy.

        ``x`` is detached; the step counter is advanced here (through its numpy view).

        Returns ``(mean, var, 1 / sigma_B, scale, shift, (r, d))`` for :class:`_Renorm`
        and the raw statistics ``(m_o, sigma_B, r, d)`` (numpy arrays of shape (C,)).
        ``r`` and ``d`` are the rows of one (2, C) array, so that one call handles both.
        """
        eps, momentum = self.eps, self.momentum
        mu, sigma, rv, w, b, steps, ones = self._numpy_views()
        upper, lower = self._bounds(rmax, dmax, mu.dtype)
        np.add(steps, 1, out=steps)
        factor = 1.0 / float(steps) if momentum is None else momentum
        mu_t = self._buffers["running_mean"]
        inv_n = 1.0 / (x.numel() // x.shape[1])
        # One pass: S1 = sum(x), S2 = sum(x (x - mu)) (see bkn.layers._moments.shifted_sums).
        _, s2, s1 = _bn_backward(x, x, None, mu_t, ones, None, None, False, 0.0, [False, True, True])
        mean, var = s1.numpy(), s2.numpy()  # views: the tensors s1, s2 become m_o, v_o in place
        mean *= inv_n
        block = np.empty((2, mean.shape[0]), mean.dtype)  # rows: sigma_B, m_o - mu
        std_b, dm = block[0], block[1]
        np.subtract(mean, mu, out=dm)
        var *= inv_n
        var -= mean * dm
        if ill_conditioned(mean, var):  # |mean| >> std: the single pass lost precision (see _moments)
            s2 = centred_var(x, s1)
            var = s2.numpy()
        # (Passing the check implies var >= 0: mean^2 >= 0 > tolerance * var for a negative var.)
        np.add(var, eps, out=std_b)
        np.sqrt(std_b, out=std_b)
        rd = block / sigma  # (sigma_B / sigma, (m_o - mu) / sigma), then clipped row-wise
        np.minimum(rd, upper, out=rd)
        np.maximum(rd, lower, out=rd)
        # Running estimates (in place, through the numpy views of the buffers).
        dm *= factor
        mu += dm
        sigma *= 1.0 - factor
        std_b_step = std_b * factor
        sigma += std_b_step
        np.multiply(sigma, sigma, out=rv)
        rv -= eps
        if w is None:
            scale_shift = rd
        else:
            scale_shift = rd * w
            scale_shift[1] += b
        r, d = rd[0], rd[1]
        args = (s1, s2, torch.from_numpy(np.reciprocal(std_b)), torch.from_numpy(scale_shift[0]),
                torch.from_numpy(scale_shift[1]), (r, d))
        return args, (mean, std_b, r, d)


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
