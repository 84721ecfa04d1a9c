"""One autograd Function behind every batch-statistic norm of the project.

It normalizes ``x`` per (group, channel) with statistics ``m, v`` and applies
the affine transform. The statistics are the observed moments ``m_o, v_o``
optionally mixed with a prior ``m_p, v_p`` (Batch Kalman Normalization, docs/design.md §1)::

    p     = 0 if mean(v_p / v_o) >= guard else p   # the ratio-100 guard (on the device, no host sync)
    m     = p_eff * m_p + (1 - p_eff) * m_o
    v     = p_eff * v_p + (1 - p_eff) * v_o + p_eff * (1 - p_eff) * (m_o - m_p)^2
    y     = weight * (x - m) / sqrt(v + eps) + bias

Why a Function and not a composition of torch ops: the composition stores
several full-size intermediates and runs 3 to 6 times slower than native
``BatchNorm2d`` on the CPU. Here the forward is one moments pass plus one
fused normalize pass (native eval-mode batch_norm), and the backward needs
only two per-(group, channel) reductions, ``S1 = sum(dy)`` and
``S2 = sum(dy * (x - m))``, after which everything is closed form::

    s     = (v + eps)^-1/2
    dm    = -weight * s * S1            + dL/dm (from later layers' priors)
    dv    = -weight * s^3 * S2 / 2      + dL/dv
    dm_o  = (1-p) dm + 2 p (1-p) (m_o - m_p) dv      dv_o = (1-p) dv
    dm_p  =    p  dm - 2 p (1-p) (m_o - m_p) dv      dv_p =   p  dv
    dp    = -(m_o - m_p) dm + (v_p - v_o + (1-2p)(m_o - m_p)^2) dv
    dx    = weight * s * dy + dm_o / n + 2 dv_o (x - m_o) / n

Without a prior (plain BN, ghost batches, Batch Renormalization) ``p = 0``.
The posterior ``m, v`` is a differentiable output, because the next layer's
prior is computed from it; gradients arriving there are added to ``dm, dv``.

On the CPU in float32/float64, :func:`normalize_with_stats` runs the same Function
compiled from ``bkn/csrc/_function.cpp`` (see :mod:`bkn.layers._native`); this Python
one is the reference, the fallback and the path on other devices and dtypes.
"""

from __future__ import annotations

import math

import torch

from .. import kernels as _kernels
from . import _checks
from ._grad_shapes import as_dtype as _as_dtype
from ._grad_shapes import sum_to as _sum_to
from ._moments import (
    _bn_backward,
    as_groups,
    batch_moments,
    ill_conditioned,
    moments_from_sums,
    per_channel_view,
    reduce_dims,
    shifted_sums,
)

# -- per-channel algebra (tensors of shape (G, C) or broadcastable to it) -------------------


def _posterior(obs_mean, obs_var, prior_mean, prior_var, p):
    d = obs_mean - prior_mean
    mean = obs_mean - p * d
    var = obs_var * (1 - p) + prior_var * p + d * d * (p - p * p)
    return d, mean, var


def _backward_coefficients(s, weight, sum_dy, sum_dy_xhat, dmean_ext, dvar_ext, count, obs_mean, prior):
    """Per-channel coefficients of the backward (module docstring).

    ``prior`` = (p, d, v_p, v_o, use) or None; ``use`` is None or a 0-d bool tensor, false where
    the guard dropped the prior: then the coefficients are selected to be exactly those without
    a prior (``p = 0``) and the prior's and gain's gradients are zeros.
    """
    ws = s if weight is None else s * weight
    dmean = -ws * sum_dy
    dvar = ws * s * sum_dy_xhat * -0.5
    if dmean_ext is not None:
        dmean = dmean + dmean_ext
    if dvar_ext is not None:
        dvar = dvar + dvar_ext
    dprior = None
    if prior is None:
        dobs_mean, dobs_var = dmean, dvar
    else:
        p, d, prior_var, obs_var, use = prior
        cross = d * dvar * (2 * (p - p * p))
        dobs_mean = dmean * (1 - p) + cross
        dobs_var = dvar * (1 - p)
        dgain = (prior_var - obs_var + d * d * (1 - 2 * p)) * dvar - d * dmean
        dprior = (dmean * p - cross, dvar * p, dgain)
        if use is not None:  # selected, not multiplied by p = 0: exact, and no 0 * inf
            dobs_mean, dobs_var = torch.where(use, dobs_mean, dmean), torch.where(use, dobs_var, dvar)
            dprior = tuple(torch.where(use, g, 0.0) for g in dprior)
    x_coef = dobs_var * (2.0 / count)
    const = dobs_mean * (1.0 / count) - x_coef * obs_mean
    return ws, x_coef, const, dprior


def _prior_used(prior_var: torch.Tensor, obs_var: torch.Tensor, guard: float) -> torch.Tensor:
    """The guard as a 0-d bool tensor on the device (no host sync): ``not sum(v_p / v_o) >= guard * count``.

    The sum is taken in the statistics' dtype and compared in float64, as the host-side
    ``float(sum) >= guard * count`` it replaces. A zero observed variance gives inf (prior
    dropped), or nan for 0/0, which fails the comparison (prior kept), as before.
    """
    ratio_sum = (prior_var / obs_var).sum().double()
    return (ratio_sum >= guard * obs_var.numel()).logical_not_()


def _observed_moments(x: torch.Tensor, prior_mean, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m_o, v_o)`` of shape (G, C).

    With a prior and one float group on the CPU: one pass over ``x`` shifted by the prior
    mean (a guess of the mean), recomputed by :func:`batch_moments` where that is
    ill-conditioned. Elsewhere :func:`batch_moments` (``var_mean`` on accelerators).
    """
    single_pass = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if prior_mean is not None and groups == 1 and single_pass:
        shift = prior_mean.detach().reshape(-1, x.shape[1])[0].to(x.dtype)
        s1, s2 = shifted_sums(x, shift)
        mean, var = moments_from_sums(s1, s2, shift, x.numel() // x.shape[1])
        if not ill_conditioned(mean, var):  # |mean| >> std: the single pass lost precision
            return mean[None], var[None]
    return batch_moments(x, groups)


def _normalize(x, weight, bias, mean, var, groups: int, eps: float) -> torch.Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` per (group, channel), in a fresh tensor."""
    if groups == 1 and (weight is None or weight.dtype == mean.dtype):
        w1 = None if weight is None else weight.reshape(-1)
        b1 = None if bias is None else bias.reshape(-1)
        return torch.batch_norm(x, w1, b1, mean[0], var[0], False, 0.0, eps, True)
    ndim = x.dim()
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    # Written into a fresh (N, C, ...) tensor, not returned as a view of a (G, g, C, ...)
    # one: callers apply in-place ops to a norm's output (ReLU(inplace=True), +=).
    y = torch.empty_like(x)
    torch.addcmul(
        per_channel_view(shift, ndim), as_groups(x, groups), per_channel_view(scale, ndim), out=as_groups(y, groups)
    )
    return y


def _gradient_sums(dy, x, mean, var, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(group, channel) ``S1 = sum(dy)`` and ``sum(dy * (x - m)) / sqrt(v + eps)``, shape (G, C)."""
    if dy is None:  # only the posterior is used downstream
        zeros = torch.zeros_like(mean)
        return zeros, zeros
    # One group on the CPU: batch norm's backward reduction (eval form, one native pass). CUDA's
    # kernel refuses that form (it insists on saved statistics and a weight), so accelerators
    # take the plain reductions below.
    if groups == 1 and dy.dtype == mean.dtype and x.device.type == "cpu":
        _, sum_dy_xhat, sum_dy = _bn_backward(dy, x, None, mean[0], var[0], None, None, False, eps, [False, True, True])
        return sum_dy.unsqueeze(0), sum_dy_xhat.unsqueeze(0)
    dims = reduce_dims(x.dim())
    dyg = as_groups(dy, groups).to(mean.dtype)
    sum_dy = dyg.sum(dims)
    # Centred, sum(dy * (x - m)), not sum(dy * x) - m * sum(dy): that cancels when |m| >> spread.
    centred = as_groups(x, groups).to(mean.dtype) - per_channel_view(mean, x.dim())
    sum_dy_xhat = centred.mul_(dyg).sum(dims).mul_(torch.rsqrt(var + eps))  # centred is a fresh tensor
    return sum_dy, sum_dy_xhat


def _input_gradient(dy, x, ws, x_coef, const, groups: int) -> torch.Tensor:
    """``dx = ws * dy + x_coef * x + const`` with per-(group, channel) coefficients."""
    ndim = x.dim()
    # (torch.addcmul with a broadcast first argument is about 2x slower on the CPU than
    # the in-place sequence below.)
    if dy is None:
        return torch.addcmul(
            per_channel_view(const, ndim), as_groups(x, groups), per_channel_view(x_coef, ndim)
        ).flatten(0, 1)
    if groups == 1:
        shape = [1, -1] + [1] * (ndim - 2)
        return (dy * ws.view(shape)).addcmul_(x, x_coef.view(shape)).add_(const.view(shape))
    dx = as_groups(dy, groups) * per_channel_view(ws, ndim)
    dx = dx.addcmul_(as_groups(x, groups), per_channel_view(x_coef, ndim))
    return dx.add_(per_channel_view(const, ndim)).flatten(0, 1)


class _NormalizeWithStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prior_mean, prior_var, gain, obs_mean, obs_var, groups, eps, guard, running):
        ctx.set_materialize_grads(False)  # unused outputs' gradients stay None, not zeros
        if obs_mean is None:
            obs_mean, obs_var = _observed_moments(x, prior_mean, groups)
        has_prior = prior_mean is not None
        p, use = 0.0, None
        if has_prior:
            stat_dtype = torch.promote_types(x.dtype, torch.float32)
            mp, vp = _as_dtype(prior_mean, stat_dtype), _as_dtype(prior_var, stat_dtype)
            p = gain
        if isinstance(p, float) and p == 0.0:
            mean, var = obs_mean, obs_var
            has_prior = False
        else:
            d, mean, var = _posterior(obs_mean, obs_var, mp, vp, p)
            if math.isfinite(guard):
                # The guard of the official code (a tf.cond there), on the device: where it drops
                # the prior the posterior is selected to be exactly the observation (p = 0).
                use = _prior_used(vp, obs_var, guard)
                mean, var = torch.where(use, mean, obs_mean), torch.where(use, var, obs_var)

        if running is not None:
            _update_running(running, mean, var, x.numel() // (groups * x.shape[1]))
        y = _normalize(x, weight, bias, mean, var, groups, eps)

        ctx.save_for_backward(x, weight, obs_mean, obs_var, mean, var)
        ctx.groups, ctx.eps = groups, eps
        # Per-channel quantities of the backward, computed now while they are at hand.
        inv_std = (var + eps).sqrt_().reciprocal_()
        ctx.per_channel = (inv_std, (p, d, vp, obs_var, use) if has_prior else None)
        ctx.shapes = tuple(
            t.shape if isinstance(t, torch.Tensor) else None for t in (weight, bias, prior_mean, prior_var, gain)
        )
        # Distinct tensors: the posterior is differentiable, the observation is not,
        # and without a prior they hold the same values.
        if mean is obs_mean:
            obs_mean, obs_var = obs_mean.clone(), obs_var.clone()
        ctx.mark_non_differentiable(obs_mean, obs_var)
        return y, mean, var, obs_mean, obs_var

    @staticmethod
    def backward(ctx, dy, dmean_ext, dvar_ext, _dobs_mean, _dobs_var):
        x, weight, obs_mean, obs_var, mean, var = ctx.saved_tensors
        weight_shape, bias_shape, mean_shape, var_shape, gain_shape = ctx.shapes
        groups = ctx.groups
        count = x.numel() // (groups * x.shape[1])
        sum_dy, sum_dy_xhat = _gradient_sums(dy, x, mean, var, groups, ctx.eps)
        inv_std, prior = ctx.per_channel
        ws, x_coef, const, dprior = _backward_coefficients(
            inv_std, weight, sum_dy, sum_dy_xhat, dmean_ext, dvar_ext, count, obs_mean, prior
        )

        grads = [None] * 12
        if dprior is not None:
            for index, g, shape in zip((3, 4, 5), dprior, (mean_shape, var_shape, gain_shape)):
                if ctx.needs_input_grad[index]:
                    grads[index] = _sum_to(g, shape)
        if ctx.needs_input_grad[0]:
            grads[0] = _as_dtype(_input_gradient(dy, x, ws, x_coef, const, groups), x.dtype)
        if ctx.needs_input_grad[1]:
            grads[1] = _as_dtype(_sum_to(sum_dy_xhat, weight_shape), weight.dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = _sum_to(sum_dy, bias_shape)
        return tuple(grads)


def _update_running(running, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """EMA of (G, C) statistics averaged over groups, var scaled by n/(n-1) as in torch (in place)."""
    running_mean, running_var, factor = running
    unbiased = count / (count - 1) if count > 1 else 1.0
    mean = mean[0] if mean.shape[0] == 1 else mean.mean(0)
    var = var[0] if var.shape[0] == 1 else var.mean(0)
    if running_mean.dtype != mean.dtype or running_mean.device != mean.device:
        mean, var = mean.to(running_mean), var.to(running_var)
    running_mean.mul_(1 - factor).add_(factor * mean)
    running_var.mul_(1 - factor).add_((factor * unbiased) * var)


def normalize_with_stats(
    x, weight, bias, prior=None, gain=None, observed=None, groups=1, eps=1e-5, guard=math.inf, running=None, check=None
):
    """Functional entry point; returns ``(y, post_mean, post_var, obs_mean, obs_var)``.

    ``prior`` is ``(mean, var)`` broadcastable to (G, C); ``gain`` a float or a
    tensor broadcastable to (G, C) (it receives a gradient if it requires one);
    ``running`` = ``(running_mean, running_var, num_batches_tracked, momentum)`` counts the
    step (if the counter is not None) and updates the buffers in place with the posterior
    (EMA with factor ``momentum``, or ``1 / steps`` for ``momentum=None``, averaged over
    groups); ``observed`` optionally passes precomputed
    ``batch_moments(x, groups)`` (treated as functions of ``x`` for gradients). ``check`` (a
    label, e.g. the layer's): the prior variance must be finite and >= 0
    (:func:`~bkn.layers._checks.check_prior_var`; on the triton backend checked inside the
    finalize kernel, one device check of its flag).
    """
    prior_mean, prior_var = prior if prior is not None else (None, None)
    obs_mean, obs_var = observed if observed is not None else (None, None)
    gain_tensor = gain if isinstance(gain, torch.Tensor) else None
    backend = _kernels.backend_for(x)
    if backend == "triton":  # the fused Triton kernels (bkn/kernels/triton_norm.py), imported on first use
        from . import _triton_function

        return _triton_function.normalize_with_stats(
            x, weight, bias, prior, gain, observed, groups, eps, guard, running, check
        )
    if check is not None and prior_var is not None:
        _checks.check_prior_var(prior_var.detach(), check)
    running_mean, running_var, steps, momentum = running if running is not None else (None, None, None, 0.0)
    native = _kernels.native_module(backend)  # None for "torch": the Python Function below
    if native is not None:  # the same Function compiled (bkn/csrc/_function.cpp), if it takes these tensors
        out = native.kalman_norm(
            x,
            weight,
            bias,
            prior_mean,
            prior_var,
            gain_tensor,
            0.0 if gain is None or gain_tensor is not None else gain,
            obs_mean,
            obs_var,
            groups,
            eps,
            guard,
            running_mean,
            running_var,
            steps,
            math.nan if momentum is None else momentum,
        )
        if out:
            return tuple(out)
    if running is not None:
        factor = momentum
        if steps is not None:
            steps.add_(1)
            # momentum=None: 1 / steps as a float64 0-d tensor on the device (no host sync); ops
            # with it round as with the Python float it replaces.
            factor = steps.double().reciprocal() if momentum is None else momentum
        running = (running_mean, running_var, factor)
    return _NormalizeWithStats.apply(
        x, weight, bias, prior_mean, prior_var, gain, obs_mean, obs_var, groups, eps, float(guard), running
    )


class _SavedMoments(torch.autograd.Function):
    """Differentiable ``(mean, var)`` of ``x`` from native batch_norm's saved statistics.

    The forward is free (the native kernel already computed them); the backward,
    ``dx = dm / n + 2 dv (x - m) / n``, runs only when a later layer's prior
    depends on this layer's posterior.
    """

    @staticmethod
    def forward(ctx, x, save_mean, save_invstd, eps):
        var = save_invstd.pow(-2) - eps
        ctx.save_for_backward(x, save_mean)
        return save_mean.unsqueeze(0), var.unsqueeze(0)

    @staticmethod
    def backward(ctx, dmean, dvar):
        x, mean = ctx.saved_tensors
        count = x.numel() // x.shape[1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        dmean = torch.zeros_like(mean) if dmean is None else dmean[0]
        dvar = torch.zeros_like(mean) if dvar is None else dvar[0]
        x_coef = (2.0 / count) * dvar
        const = dmean / count - x_coef * mean
        dx = torch.addcmul(const.view(shape), x, x_coef.view(shape))
        return dx.to(x.dtype), None, None, None


def native_batch_norm_train(x, weight, bias, running_mean, running_var, factor, eps):
    """``torch.nn.BatchNorm`` training forward, bit for bit, plus a differentiable posterior.

    Returns ``(y, mean, var)``; running buffers (if given) are updated by the
    native kernel exactly as torch's layer does.
    """
    y, save_mean, save_invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, factor, eps)
    mean, var = _SavedMoments.apply(x, save_mean, save_invstd, eps)
    return y, mean, var
