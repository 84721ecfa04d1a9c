"""Batch Renormalization's training step (docs/design.md §6) as Python autograd Functions.

With the corrections ``r, d`` constant, BRN's output is batch normalization with the
affine ``gamma r`` and ``beta + gamma d``. :func:`renorm_train` computes the observed
moments, the corrections and the update of the running estimates, and normalizes:

* one group (the usual case): :class:`Renorm`, on torch's native batch-norm kernels (an
  eval-mode normalize pass forward, BN's own backward kernel), with the moments from one
  pass over ``x`` on the CPU;
* several groups: the project's fused Function
  (:func:`bkn.layers._function.normalize_with_stats`) with a per-(group, channel) affine.

One group on the CPU in float32/float64 runs the same step compiled instead (``Renorm`` in
``bkn/csrc/_renorm_function.cpp``, see :mod:`bkn.layers._native`), when that could be built; this
Python one is the reference the tests compare it with, the path on other devices and
dtypes, and the fallback.
"""

from __future__ import annotations

import math

import torch

from .. import kernels as _kernels
from ._function import normalize_with_stats
from ._moments import batch_moments, centred_var, ill_conditioned, shifted_sums

_bn_backward = torch.ops.aten.native_batch_norm_backward


class Renorm(torch.autograd.Function):
    """BRN's training forward and backward for one group, on torch's native batch-norm kernels.

    With constant ``r, d`` the output is batch normalization with the affine
    ``scale = gamma r``, ``shift = beta + gamma d``, so::

        forward:  y = eval-mode batch_norm(x, scale, shift, m_o, v_o)              (one fused pass)
        backward: dx, dscale, dshift = native_batch_norm_backward(train=True)   (BN's own kernel)
                  dgamma = r dscale + d dshift,  dbeta = dshift

    The per-channel inputs, shape (C,), are precomputed and carry no gradient;
    ``rd = (r, d)``.
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
            dy, x, scale, None, None, mean, invstd, True, ctx.eps, [need_x, need_w, need_w or need_b]
        )
        dweight = None
        if need_w:
            r, d = ctx.rd
            dweight = torch.addcmul(dscale * r, dshift, d)
        return dx, dweight, dshift if need_b else None, None, None, None, None, None, None, None


def renorm_train(x, weight, bias, running_mean, running_std, running_var, steps, momentum, rmax, dmax, eps, groups):
    """One training step of BRN; returns ``(y, m_o, sigma_B, r, d)``.

    The statistics are detached, of shape (C,) for one group and (G, C) for several.
    Counts the step in ``steps`` and updates the running estimates in place: ``mu``
    and ``sigma`` move towards the mean over groups of ``m_o`` and of ``sigma_B`` with
    the factor ``momentum`` (``1 / steps`` for ``momentum=None``), and
    ``running_var = sigma**2 - eps``. ``rmax``, ``dmax`` are floats or 0-d tensors (a
    scheduled layer's limits, computed on the device); or ``rmax`` is a
    :class:`~bkn.layers.renorm.RenormSchedule` (``dmax`` None): the limits at the step counted
    in ``steps`` before this one, ``rmax.on_device(steps)`` (the Triton kernel computes them
    from the counter itself, in float64 as ``on_device`` does: no separate ops).
    """
    backend = _kernels.backend_for(x)
    if hasattr(rmax, "on_device") and backend != "triton":
        rmax, dmax = rmax.on_device(steps)  # before the step is counted
    if backend == "triton":  # the fused Triton kernels (bkn/kernels/triton_norm.py), imported on first use
        from . import _triton_function

        return _triton_function.renorm_train(
            x, weight, bias, running_mean, running_std, running_var, steps, momentum, rmax, dmax, eps, groups
        )
    native = _kernels.native_module(backend) if groups == 1 else None
    if native is not None:  # the compiled Renorm, if it takes these tensors ([] if not)
        out = native.renorm(
            x,
            weight,
            bias,
            running_mean,
            running_std,
            running_var,
            steps,
            math.nan if momentum is None else momentum,
            float(rmax),  # a scheduled limit may be a 0-d tensor; the compiled path runs on the host
            float(dmax),
            eps,
        )
        if out:
            return tuple(out)
    steps.add_(1)
    # momentum=None: 1 / steps as a float64 0-d tensor on the device (no host sync); ops with it
    # round as with the Python float it replaces.
    factor = steps.double().reciprocal() if momentum is None else momentum
    running = (running_mean, running_std, running_var)
    if groups == 1 and x.dtype == running_std.dtype and (weight is None or weight.dtype == x.dtype):
        args, raw = _one_group(x, weight, bias, running, factor, rmax, dmax, eps)
        return (Renorm.apply(x, weight, bias, *args, eps), *raw)
    with torch.no_grad():
        mean, var = batch_moments(x, groups)
        std_b, r, d = _corrections(mean, var, running, rmax, dmax, factor, eps)
    # The shared Function, with the constant corrections folded into a per-(group,
    # channel) affine ``gamma r, beta + gamma d`` (autograd ops: gamma and beta get gradients).
    if weight is None:
        weight, bias = r, d
    else:
        bias = torch.addcmul(bias, weight, d)
        weight = weight * r
    y = normalize_with_stats(x, weight, bias, observed=(mean, var), groups=groups, eps=eps)[0]
    return y, mean, std_b, r, d


def _moments_about(x: torch.Tensor, mu: torch.Tensor):
    """``m_o``, ``v_o`` and ``m_o - mu`` of one group, shape (C,).

    On the CPU in float32/float64 one pass over ``x``, shifted by the running mean ``mu``
    (``S1 = sum(x)``, ``S2 = sum(x (x - mu))``, see :func:`bkn.layers._moments.shifted_sums`),
    the variance recomputed from ``x - m_o`` where that lost precision; elsewhere
    :func:`bkn.layers._moments.batch_moments`.
    """
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        inv_n = 1.0 / (x.numel() // x.shape[1])
        s1, s2 = shifted_sums(x, mu)
        mean = s1.mul_(inv_n)
        dm = mean - mu
        var = s2.mul_(inv_n).sub_(mean * dm)
        if ill_conditioned(mean, var):  # |mean| >> std: the single pass lost precision (see _moments)
            var = centred_var(x, mean)
        # (Passing the check implies var >= 0: mean^2 >= 0 > tolerance * var for a negative var.)
        return mean, var, dm
    mean, var = batch_moments(x)
    return mean[0], var[0], mean[0] - mu


@torch.no_grad()
def _one_group(x, weight, bias, running, factor: float, rmax: float, dmax: float, eps: float):
    """The corrections and the inputs of :class:`Renorm` for one group, as the compiled ``Renorm`` computes them.

    Returns ``(mean, var, 1 / sigma_B, scale, shift, (r, d))`` for :class:`Renorm` and the
    raw statistics ``(m_o, sigma_B, r, d)``, of shape (C,). Updates the running estimates.
    """
    mu, sigma, running_var = running
    mean, var, dm = _moments_about(x, mu)
    std_b = (var + eps).sqrt_()
    r = (std_b / sigma).clamp_(1.0 / rmax, rmax)
    d = (dm / sigma).clamp_(-dmax, dmax)
    # Running estimates: mu towards m_o, sigma towards sigma_B.
    mu.add_(dm.mul_(factor))
    sigma.mul_(1.0 - factor).add_(std_b * factor)
    torch.mul(sigma, sigma, out=running_var).sub_(eps)
    if weight is None:
        scale, shift = r, d
    else:
        scale, shift = weight * r, torch.addcmul(bias, weight, d)
    return (mean, var, std_b.reciprocal(), scale, shift, (r, d)), (mean, std_b, r, d)


def _corrections(mean, var, running, rmax: float, dmax: float, factor: float, eps: float):
    """``sigma_B, r, d`` (G, C) from (G, C) moments and the running estimates, which are then updated."""
    mu_t, sigma_t, running_var = running
    std_b = torch.sqrt(var + eps)
    sigma = sigma_t.to(std_b.dtype)
    r = (std_b / sigma).clamp_(1.0 / rmax, rmax)
    d = ((mean - mu_t.to(mean.dtype)) / sigma).clamp_(-dmax, dmax)
    # Running estimates: towards the mean over groups of m_o and of sigma_B.
    if isinstance(factor, torch.Tensor):  # lerp_ wants a weight tensor of its own dtype
        factor = factor.to(mu_t.dtype)
    mu_t.lerp_(mean.mean(0).to(mu_t.dtype), factor)
    sigma_t.lerp_(std_b.mean(0).to(sigma_t.dtype), factor)
    torch.mul(sigma_t, sigma_t, out=running_var).sub_(eps)
    return std_b, r, d
